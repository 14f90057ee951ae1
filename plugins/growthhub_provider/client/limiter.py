"""The in-process limiter of a location's burst window and daily quota (``local`` coordination)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


def quota_day() -> int:
    """The UTC day (days since 1970-01-01) GrowthHub's daily quota counts in; read at call time, so
    a test can move it with the sandbox's ``POST /_sandbox/day`` instead of waiting for midnight."""
    return int(time.time() // 86_400)


def int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class LocalRateLimiter:
    """
    Sliding-window limiter shared by the threads and clients of this process that send to one location.

    A request holds a slot from the moment it is sent until ``interval`` after its *response*
    arrived. The server counts a request somewhere between those two instants, so no window the
    server can draw ever sees more than ``burst`` requests from us: the limiter runs at the
    configured rate minus one latency per window, without 429s.

    Server headers win over the defaults (``X-RateLimit-Max``, ``-Interval-Milliseconds``);
    a limit set explicitly on the connection stays a cap. ``X-RateLimit-Remaining`` below our own
    count means someone else spends the same quota, so the difference is booked as used.

    :param burst: requests allowed per ``interval_s``.
    :param interval_s: length of the burst window in seconds.
    :param burst_cap: explicit upper bound from the connection, kept even if the server allows more.
    :param daily: requests allowed per day: the estimate of what is left until a response says,
        and again at each new UTC day (``X-RateLimit-Limit-Daily`` replaces it once known).
    """

    def __init__(
        self, burst: int, interval_s: float, burst_cap: int | None = None, daily: int | None = None
    ) -> None:
        self.burst = burst
        self.interval_s = interval_s
        self.burst_cap = burst_cap
        self.daily_limit = daily
        self._daily_remaining = daily
        self._day = quota_day()
        self._learned = False
        """A response of ``_day`` said what was left: later figures of that day only lower it."""
        self._done: deque[float] = deque()
        self._in_flight = 0
        self._blocked_until = 0.0
        self._cond = threading.Condition()
        self._turn = threading.Lock()
        """Held by the thread at the head of the line, the only one waiting on ``_cond``."""
        self._wait_untimed = False
        """The head waits with no deadline (all slots in flight): a release must wake it."""

    def acquire(self, daily_reserve: int | None = None) -> bool:
        """
        Block until a request may be sent and take its slot.

        :param daily_reserve: refuse (return ``False``) once the known daily quota is down to this;
            ``None`` ignores the daily quota (retries of a row already sent).
        """
        with self._turn, self._cond:
            while True:
                self._roll()
                if (
                    daily_reserve is not None
                    and self._daily_remaining is not None
                    and self._daily_remaining <= daily_reserve
                ):
                    return False
                now = time.monotonic()
                self._expire(now)
                if now < self._blocked_until:
                    self._cond.wait(self._blocked_until - now)
                elif len(self._done) + self._in_flight < self.burst:
                    self._in_flight += 1
                    if self._daily_remaining:  # never below 0: a retry past the quota learns nothing
                        self._daily_remaining -= 1
                    return True
                elif self._done:
                    self._cond.wait(self._done[0] + self.interval_s - now)
                else:
                    self._wait_untimed = True
                    self._cond.wait()
                    self._wait_untimed = False

    @property
    def daily_remaining(self) -> int | None:
        """Daily quota left: the server's last figure less what went out since (the limit on a new day)."""
        with self._cond:
            self._roll()
            return self._daily_remaining

    def _roll(self) -> None:
        """At a new UTC day the quota is full again: a process that spent it yesterday sends again."""
        day = quota_day()
        if day != self._day:
            self._day, self._learned = day, False
            self._daily_remaining = self.daily_limit

    def release(self, headers: Mapping[str, str] | None = None, *, throttled: bool = False) -> None:
        """
        Give back the slot taken by :meth:`acquire` once the response (or the error) is in.

        :param headers: response headers, to learn the server's limits and remaining quota.
        :param throttled: the server answered 429: stop sending for a whole interval, since no
            header says when the window frees up.
        """
        with self._cond:
            now = time.monotonic()
            self._in_flight -= 1
            self._done.append(now)
            limits = (self.burst, self.interval_s)
            if headers is not None:
                self._adapt(headers, now)
            if throttled:
                self._blocked_until = max(self._blocked_until, now + self.interval_s)
            # A release frees no slot (it starts the slot's interval): the head's deadline still
            # holds unless it had none or the server changed the limits.
            if self._wait_untimed or limits != (self.burst, self.interval_s):
                self._cond.notify()

    def _adapt(self, headers: Mapping[str, str], now: float) -> None:
        burst = int_header(headers, "X-RateLimit-Max")
        interval_ms = int_header(headers, "X-RateLimit-Interval-Milliseconds")
        remaining = int_header(headers, "X-RateLimit-Remaining")
        daily = int_header(headers, "X-RateLimit-Daily-Remaining")
        daily_limit = int_header(headers, "X-RateLimit-Limit-Daily")
        if burst is not None and burst > 0:
            self.burst = min(burst, self.burst_cap) if self.burst_cap else burst
        if interval_ms is not None and interval_ms > 0:
            self.interval_s = interval_ms / 1000
        if remaining is not None and burst is not None:
            self._expire(now)
            # never more than one window's worth: a 429 from a server allowing millions per
            # window would otherwise book millions of entries, again on every 429
            unseen = min(burst - remaining, self.burst) - (len(self._done) + self._in_flight)
            self._done.extend([now] * max(unseen, 0))
        if daily_limit is not None and daily_limit > 0:
            self.daily_limit = daily_limit
        if daily is not None:
            # Requests still in flight may not be in this figure yet; and answers overtake each
            # other, so within a UTC day the estimate only goes down.
            estimate = max(daily - self._in_flight, 0)
            self._roll()
            if not self._learned or self._daily_remaining is None or estimate < self._daily_remaining:
                self._daily_remaining = estimate
            self._learned = True

    def _expire(self, now: float) -> None:
        horizon = now - self.interval_s
        while self._done and self._done[0] <= horizon:
            self._done.popleft()
