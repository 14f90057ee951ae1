"""Unit tests of the client-side rate limiter (no HTTP)."""

from __future__ import annotations

import threading
import time

import pytest

from growthhub_provider.client.limiter import LocalRateLimiter as RateLimiter


def _headers(**values: int) -> dict[str, str]:
    names = {
        "max": "X-RateLimit-Max",
        "remaining": "X-RateLimit-Remaining",
        "interval_ms": "X-RateLimit-Interval-Milliseconds",
        "daily_remaining": "X-RateLimit-Daily-Remaining",
    }
    return {names[k]: str(v) for k, v in values.items()}


class TestRateLimiter:
    def test_never_lets_more_than_burst_into_any_window(self) -> None:
        limiter = RateLimiter(burst=5, interval_s=0.2)
        sent: list[float] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(5):
                limiter.acquire()
                with lock:
                    sent.append(time.monotonic())
                time.sleep(0.005)
                limiter.release()

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent.sort()
        assert len(sent) == 20
        for i in range(len(sent) - 5):
            assert sent[i + 5] - sent[i] >= 0.2

    def test_runs_close_to_the_configured_rate(self) -> None:
        limiter = RateLimiter(burst=10, interval_s=0.1)
        started = time.monotonic()
        for _ in range(50):
            limiter.acquire()
            limiter.release()
        # 5 windows of 10: the first is free, 4 intervals must pass.
        assert 0.4 <= time.monotonic() - started < 0.6

    @pytest.mark.parametrize(
        ("cap", "server_max", "expected"),
        [(None, 1000, 1000), (None, 50, 50), (200, 1000, 200), (200, 50, 50)],
        ids=["server-raises", "server-lowers", "cap-holds", "server-below-cap"],
    )
    def test_takes_burst_from_the_server_within_the_connection_cap(
        self, cap: int | None, server_max: int, expected: int
    ) -> None:
        limiter = RateLimiter(burst=100, interval_s=10, burst_cap=cap)
        limiter.acquire()
        limiter.release(_headers(max=server_max, interval_ms=2000))
        assert limiter.burst == expected
        assert limiter.interval_s == 2.0

    def test_books_quota_spent_by_other_clients(self) -> None:
        limiter = RateLimiter(burst=10, interval_s=60)
        limiter.acquire()
        # Server: 8 of 10 used in this window, though we sent only one.
        limiter.release(_headers(max=10, remaining=2, interval_ms=60_000))
        assert limiter.acquire()
        limiter.release()
        blocked = threading.Thread(target=limiter.acquire, daemon=True)
        limiter.acquire()
        blocked.start()
        blocked.join(0.1)
        assert blocked.is_alive(), "the 11th request of the window must wait"

    def test_books_at_most_one_window_however_large_the_servers_limit(self) -> None:
        limiter = RateLimiter(burst=10_000, interval_s=60, burst_cap=10_000)
        for _ in range(5):
            limiter.acquire()
        for _ in range(5):  # a storm of 429s from a server allowing 10**9 per window
            limiter.release(_headers(max=10**9, remaining=0, interval_ms=60_000))
        assert len(limiter._done) == 10_000

    def test_holds_everyone_back_for_an_interval_after_a_429(self) -> None:
        limiter = RateLimiter(burst=100, interval_s=10)
        limiter.acquire()
        limiter.release(_headers(max=100, remaining=0, interval_ms=150), throttled=True)
        started = time.monotonic()
        limiter.acquire()
        assert time.monotonic() - started >= 0.14

    def test_tracks_the_daily_quota_and_refuses_at_the_reserve(self) -> None:
        limiter = RateLimiter(burst=100, interval_s=10, daily=200_000)
        assert limiter.daily_remaining == 200_000
        assert limiter.acquire(daily_reserve=5)
        limiter.release(_headers(daily_remaining=7))
        assert limiter.daily_remaining == 7
        assert limiter.acquire(daily_reserve=5)
        limiter.release()
        assert limiter.daily_remaining == 6
        assert limiter.acquire(daily_reserve=5)
        limiter.release()
        assert not limiter.acquire(daily_reserve=5)
        assert limiter.acquire(daily_reserve=None), "a retry is not held to the reserve"
        limiter.release(_headers(daily_remaining=9))
        assert limiter.daily_remaining == 4, "a late answer with an older figure does not raise it"

    def test_retries_past_a_spent_quota_leave_it_at_zero(self) -> None:
        limiter = RateLimiter(burst=100, interval_s=10, daily=1)
        for _ in range(3):
            assert limiter.acquire(daily_reserve=None)
            limiter.release()
        assert limiter.daily_remaining == 0
        assert not limiter.acquire(daily_reserve=0)

    def test_waiting_workers_wake_about_once_per_slot(self) -> None:
        """Ten workers held back by the window: each freed slot wakes one of them, not all ten."""
        limiter = RateLimiter(burst=4, interval_s=0.05)
        wakes = 0
        wait = limiter._cond.wait

        def counted_wait(timeout: float | None = None) -> bool:
            nonlocal wakes
            woke = wait(timeout)
            wakes += 1
            return woke

        limiter._cond.wait = counted_wait  # type: ignore[method-assign]

        def worker() -> None:
            for _ in range(4):
                limiter.acquire()
                time.sleep(0.002)
                limiter.release()

        threads = [threading.Thread(target=worker) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        slots_waited_for = 40 - 4
        assert wakes <= 2 * slots_waited_for, f"{wakes} wake-ups for {slots_waited_for} slots"

    def test_a_release_wakes_the_head_when_every_slot_was_in_flight(self) -> None:
        limiter = RateLimiter(burst=1, interval_s=0.05)
        limiter.acquire()
        got = threading.Event()
        waiter = threading.Thread(target=lambda: (limiter.acquire(), got.set()))
        waiter.start()
        time.sleep(0.02)
        assert not got.is_set(), "the only slot is in flight"
        limiter.release()
        assert got.wait(1.0), "the head learnt the slot's deadline from the release"
        waiter.join()
