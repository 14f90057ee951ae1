"""What stands between an authenticated request and the store: rate limits and injected faults."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from growthhub_sandbox.models import FaultConfig, RateLimitConfig


class RateLimiter:
    """Fixed burst window (starting at a bucket's first request) plus a UTC-day counter.

    Buckets are keyed by ``Token.rate_key``: (location, app), as the real API limits per app
    (OAuth client) and location; a static token without a client counts as an app of its own.
    The day is the UTC day plus ``day_offset``, which ``new_day`` advances so a test can live
    through several days' quotas in seconds.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> [window start (monotonic), count in window, day number, count in day]
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self.day_offset = 0

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()
            self.day_offset = 0

    def new_day(self) -> int:
        """Start the next day now, as UTC midnight does: every daily count restarts at zero."""
        with self._lock:
            self.day_offset += 1
            return self.day_offset

    def _bucket(self, key: tuple[str, str], limits: RateLimitConfig) -> list[float]:
        now = time.monotonic()
        day = time.time() // 86_400 + self.day_offset
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [now, 0, day, 0]
        if (now - bucket[0]) * 1000 >= limits.intervalMs:
            bucket[0], bucket[1] = now, 0
        if bucket[2] != day:
            bucket[2], bucket[3] = day, 0
        return bucket

    def hit(self, key: tuple[str, str], limits: RateLimitConfig) -> tuple[bool, dict[str, str]]:
        """Count one request if the bucket has room; ``(allowed, X-RateLimit-* headers)``."""
        with self._lock:
            bucket = self._bucket(key, limits)
            allowed = bucket[1] < limits.burst and bucket[3] < limits.daily
            if allowed:
                bucket[1] += 1
                bucket[3] += 1
            return allowed, _headers(bucket, limits)

    def peek(self, key: tuple[str, str], limits: RateLimitConfig) -> dict[str, str]:
        """Headers for a response that does not count against the limit (403)."""
        with self._lock:
            return _headers(self._bucket(key, limits), limits)


def _headers(bucket: list[float], limits: RateLimitConfig) -> dict[str, str]:
    return {
        "X-RateLimit-Max": str(limits.burst),
        "X-RateLimit-Remaining": str(max(0, limits.burst - int(bucket[1]))),
        "X-RateLimit-Interval-Milliseconds": str(limits.intervalMs),
        "X-RateLimit-Limit-Daily": str(limits.daily),
        "X-RateLimit-Daily-Remaining": str(max(0, limits.daily - int(bucket[3]))),
    }


def storm_headers(headers: dict[str, str]) -> dict[str, str]:
    """A forced 429 reports an empty burst window, like a real one."""
    return {**headers, "X-RateLimit-Remaining": "0"}


@dataclass(frozen=True)
class Fault:
    kind: str  # "error", "timeout", "drop" or "storm"
    status: int = 0


class FaultInjector:
    """Decides, per request and in arrival order, which fault (if any) it gets."""

    def __init__(self, default_seed: int) -> None:
        self._default_seed = default_seed
        self._lock = threading.Lock()
        self.configure(FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(self._default_seed if config.seed is None else config.seed)
            self._seen = 0
            self.counts: Counter[str] = Counter()
            self.active = bool(
                config.error_rate
                or config.timeout_rate
                or config.drop_rate
                or config.latency_ms
                or (config.storm_every_n and config.storm_length)
            )

    def count_ignored(self, sent: Collection[str], created: bool) -> None:
        """Count an upsert that the ``ignore_fields`` fault kept some sent fields out of."""
        ignored = self.config.ignore_fields.create if created else self.config.ignore_fields.update
        if any(name in sent for name in ignored):
            with self._lock:
                self.counts["ignore_fields"] += 1

    def decide(self) -> Fault | None:
        """One draw per request (even when no fault fires) keeps the sequence reproducible."""
        cfg = self.config
        with self._lock:
            self._seen += 1
            if cfg.latency_ms:
                self.counts["latency"] += 1
            if (
                cfg.storm_every_n
                and (self._seen - 1) % cfg.storm_every_n >= cfg.storm_every_n - cfg.storm_length
            ):
                self.counts["storm"] += 1
                return Fault("storm", 429)
            draw = self._rng.random()
            status = self._rng.choice(cfg.error_statuses) if cfg.error_statuses else 500
            for kind, rate in (
                ("error", cfg.error_rate),
                ("timeout", cfg.timeout_rate),
                ("drop", cfg.drop_rate),
            ):
                if draw < rate:
                    self.counts[kind] += 1
                    return Fault(kind, status if kind == "error" else 0)
                draw -= rate
            return None
