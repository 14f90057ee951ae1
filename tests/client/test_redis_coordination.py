"""
The ``redis`` coordination against a real Redis: one window, one daily quota and one token state
for every process of a location, and no unlimited sending when Redis goes away.

Needs Redis on ``GROWTHHUB_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``; ``scripts/ensure-redis``
starts one). Every test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis

from growthhub_provider.client.coordination import LimitSettings, TokenState
from growthhub_provider.client.errors import CoordinationError
from growthhub_provider.client.redis_coordination import (
    RedisCoordination,
    RedisRateLimiter,
    redis_client_from_url,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.process import BaseProcess
    from pathlib import Path

REDIS_URL = os.environ.get("GROWTHHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
API = "http://growthhub.test"
LOCATION = "loc1"
GRANT = "growthhub_default"
SPAWN = multiprocessing.get_context("spawn")


def _coordination(url: str, prefix: str, **kwargs: float) -> RedisCoordination:
    return RedisCoordination(redis_client_from_url(url), API, LOCATION, key_prefix=prefix, **kwargs)


def _headers(**values: int) -> dict[str, str]:
    names = {
        "max": "X-RateLimit-Max",
        "remaining": "X-RateLimit-Remaining",
        "interval_ms": "X-RateLimit-Interval-Milliseconds",
        "daily_remaining": "X-RateLimit-Daily-Remaining",
    }
    return {names[k]: str(v) for k, v in values.items()}


def _taken_at_once(limiter: RedisRateLimiter, attempts: int = 20, quick_s: float = 0.1) -> int:
    """How many requests go out back to back before the limiter makes one wait."""
    for taken in range(attempts):
        started = time.monotonic()
        limiter.acquire()
        limiter.release()
        if time.monotonic() - started > quick_s:
            return taken
    return attempts


# Children of the multi-process tests (spawned: they import this module afresh).


def _send_for(
    url: str, prefix: str, settings: LimitSettings, barrier: Any, duration_s: float, out: Any
) -> None:
    limiter = _coordination(url, prefix).limiter(settings)
    barrier.wait(timeout=30)
    stamps: list[float] = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        limiter.acquire()
        stamps.append(time.time())
        time.sleep(0.002)  # the request
        limiter.release()
    out.put(stamps)


def _acquire_and_hang(url: str, prefix: str, settings: LimitSettings, lease_s: float, out: Any) -> None:
    _coordination(url, prefix, lease_s=lease_s).limiter(settings).acquire()
    out.put(time.time())
    time.sleep(60)


def _hold_refresh_lock(url: str, prefix: str, lock_ttl_s: float, out: Any) -> None:
    with _coordination(url, prefix, lock_ttl_s=lock_ttl_s).token_store(GRANT).refresh_lock():
        out.put(time.time())
        time.sleep(60)


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis_client_from_url(REDIS_URL)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} (run scripts/ensure-redis): {exc}")
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"ghtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in redis_client.scan_iter(match=f"{prefix}:*"):
        redis_client.delete(key)


@pytest.fixture
def coordination(prefix: str) -> RedisCoordination:
    return _coordination(REDIS_URL, prefix, lock_ttl_s=1.0, lease_s=1.0)


@pytest.fixture
def spawn() -> Iterator[Callable[..., BaseProcess]]:
    """Start a child process; any still alive at the end is killed."""
    children: list[BaseProcess] = []

    def start(target: Callable[..., None], *args: Any) -> BaseProcess:
        child = SPAWN.Process(target=target, args=args, daemon=True)
        child.start()
        children.append(child)
        return child

    yield start
    for child in children:
        if child.is_alive():
            child.kill()
        child.join(5)


def _kill(child: BaseProcess) -> None:
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)


class TestSharedWindow:
    def test_processes_share_one_window_at_close_to_the_limit(
        self, prefix: str, spawn: Callable[..., BaseProcess]
    ) -> None:
        burst, interval_s, duration_s, processes = 10, 0.5, 2.0, 4
        settings = LimitSettings(burst=burst, interval_s=interval_s, daily=None)
        barrier, out = SPAWN.Barrier(processes), SPAWN.Queue()
        for _ in range(processes):
            spawn(_send_for, REDIS_URL, prefix, settings, barrier, duration_s, out)
        stamps = sorted(t for _ in range(processes) for t in out.get(timeout=30))

        crowded = [
            (stamps[i], stamps[i + burst])
            for i in range(len(stamps) - burst)
            if stamps[i + burst] - stamps[i] < interval_s - 0.002
        ]
        assert not crowded, f"{len(crowded)} windows of {interval_s} s saw more than {burst} requests"
        sent = sum(1 for t in stamps if t < stamps[0] + duration_s)
        assert sent >= 0.8 * burst * duration_s / interval_s

    def test_daily_quota_is_shared(self, prefix: str) -> None:
        settings = LimitSettings(burst=1000, interval_s=10, daily=30)
        limiters = [_coordination(REDIS_URL, prefix).limiter(settings) for _ in range(2)]
        taken = [0] * 8

        def send(n: int) -> None:
            limiter = limiters[n % 2]
            while taken[n] < 100 and limiter.acquire(daily_reserve=0):  # bounded if the quota leaks
                taken[n] += 1
                limiter.release()

        threads = [threading.Thread(target=send, args=(n,), daemon=True) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sum(taken) == 30
        assert sum(taken[0::2]) > 0
        assert sum(taken[1::2]) > 0
        assert limiters[1].daily_remaining == 0
        assert limiters[0].acquire(daily_reserve=None), "a retry is not held to the quota"
        limiters[0].release()
        assert limiters[1].daily_remaining == 0, "nor does it drive the estimate below zero"

    def test_daily_remaining_header_lowers_the_shared_estimate(self, prefix: str) -> None:
        settings = LimitSettings(burst=1000, interval_s=10, daily=200_000)
        first, second = (_coordination(REDIS_URL, prefix).limiter(settings) for _ in range(2))
        assert second.daily_remaining == 200_000
        second.acquire()  # in flight while the header arrives: not in the server's figure yet
        first.acquire()
        first.release(_headers(daily_remaining=5))
        assert second.daily_remaining == 4
        second.release(_headers(daily_remaining=100))  # an older answer overtaking: not raised
        assert first.daily_remaining == 4
        assert sum(first.acquire(daily_reserve=1) for _ in range(5)) == 3


class TestHeaders:
    SETTINGS = LimitSettings(burst=10, interval_s=0.5, daily=None)

    def test_server_max_and_interval_apply_to_every_limiter(self, coordination: RedisCoordination) -> None:
        teller, other = coordination.limiter(self.SETTINGS), coordination.limiter(self.SETTINGS)
        teller.acquire()
        teller.release(_headers(max=3, interval_ms=300))
        released = time.monotonic()
        for _ in range(2):
            other.acquire()
            other.release()
        assert time.monotonic() - released < 0.1
        other.acquire()  # the window of 3 is full until 300 ms after the teller's release
        assert 0.28 <= time.monotonic() - released < 0.45

    def test_burst_cap_holds_above_server_max(self, coordination: RedisCoordination) -> None:
        capped = coordination.limiter(LimitSettings(burst=10, interval_s=0.5, burst_cap=4, daily=None))
        capped.acquire()
        capped.release(_headers(max=1000))
        assert _taken_at_once(capped) == 3

    def test_server_remaining_below_our_count_is_booked(self, coordination: RedisCoordination) -> None:
        teller, other = coordination.limiter(self.SETTINGS), coordination.limiter(self.SETTINGS)
        teller.acquire()
        teller.release(_headers(max=10, remaining=4))  # the server saw 6, we sent 1
        assert _taken_at_once(other) == 4

    def test_booking_is_at_most_one_window(
        self, coordination: RedisCoordination, redis_client: redis.Redis
    ) -> None:
        limiter = coordination.limiter(LimitSettings(burst=10, interval_s=0.5, burst_cap=10, daily=None))
        limiter.acquire()
        limiter.release(_headers(max=1_000_000, remaining=0))
        assert redis_client.zcard(f"{coordination.key_base}:limiter:done") == 10

    def test_429_blocks_every_limiter_for_an_interval(self, coordination: RedisCoordination) -> None:
        throttled, other = coordination.limiter(self.SETTINGS), coordination.limiter(self.SETTINGS)
        throttled.acquire()
        throttled.release(throttled=True)
        started = time.monotonic()
        other.acquire()
        assert 0.45 <= time.monotonic() - started < 0.8


class TestDeadHolders:
    def test_slot_of_a_killed_worker_frees_after_its_lease(
        self, prefix: str, spawn: Callable[..., BaseProcess]
    ) -> None:
        settings, lease_s = LimitSettings(burst=1, interval_s=0.2, daily=None), 1.0
        out = SPAWN.Queue()
        child = spawn(_acquire_and_hang, REDIS_URL, prefix, settings, lease_s, out)
        taken_at = out.get(timeout=30)
        _kill(child)
        limiter = _coordination(REDIS_URL, prefix, lease_s=lease_s).limiter(settings)
        waiter = threading.Thread(target=limiter.acquire, daemon=True)
        waiter.start()
        waiter.join(lease_s + 1)
        assert not waiter.is_alive(), "the killed worker's slot never freed"
        assert lease_s - 0.05 <= time.time() - taken_at < lease_s + 0.4

    def test_refresh_lock_of_a_killed_holder_expires(
        self, prefix: str, spawn: Callable[..., BaseProcess]
    ) -> None:
        lock_ttl_s = 1.0
        out = SPAWN.Queue()
        holder = spawn(_hold_refresh_lock, REDIS_URL, prefix, lock_ttl_s, out)
        locked_at = out.get(timeout=30)
        store = _coordination(REDIS_URL, prefix, lock_ttl_s=lock_ttl_s).token_store(GRANT)
        got_it = threading.Event()

        def wait_for_lock() -> None:
            with store.refresh_lock():
                got_it.set()

        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        assert not got_it.wait(0.4), "the lock was taken while its holder lived"
        killed_at = time.time()
        _kill(holder)
        assert got_it.wait(lock_ttl_s + 1)
        waiter.join()
        assert killed_at < time.time() < locked_at + lock_ttl_s + 0.3

    def test_an_expired_holder_does_not_release_the_next_ones_lock(
        self, prefix: str, redis_client: redis.Redis
    ) -> None:
        slow_store, fast_store = (
            _coordination(REDIS_URL, prefix, lock_ttl_s=0.2).token_store(GRANT) for _ in range(2)
        )
        with slow_store.refresh_lock():
            time.sleep(0.3)  # the lock expired under the slow holder
            next_lock = fast_store.refresh_lock()
            next_lock.__enter__()
        assert redis_client.exists(fast_store.lock_key)
        next_lock.__exit__(None, None, None)
        assert not redis_client.exists(fast_store.lock_key)

    def test_lock_not_had_in_time_raises(self, prefix: str, redis_client: redis.Redis) -> None:
        store = _coordination(REDIS_URL, prefix, lock_ttl_s=0.2).token_store(GRANT)
        redis_client.set(store.lock_key, "a holder with a longer lock", px=5000)
        started = time.monotonic()
        with pytest.raises(CoordinationError, match="refresh lock"), store.refresh_lock():
            pass
        assert 0.35 <= time.monotonic() - started < 1.0


class TestTokenState:
    def test_round_trip_and_a_new_seed_wins(self, coordination: RedisCoordination) -> None:
        store, other_worker = coordination.token_store(GRANT), coordination.token_store(GRANT)
        assert store.load("seed-1") is None
        state = TokenState(refresh_token="r2", access_token="a2", expires_at=1_800_000_000.5)
        store.save("seed-1", state)
        assert other_worker.load("seed-1") == state
        assert other_worker.load("seed-from-re-authorisation") is None
        assert coordination.token_store("other_conn").load("seed-1") is None
        store.save("seed-1", TokenState(refresh_token="r3"))
        assert other_worker.load("seed-1") == TokenState(refresh_token="r3")

    def test_every_key_expires(
        self, coordination: RedisCoordination, prefix: str, redis_client: redis.Redis
    ) -> None:
        limiter = coordination.limiter(LimitSettings(burst=10, interval_s=0.5, daily=1000))
        limiter.acquire()
        limiter.acquire()  # still in flight: its lease stays
        limiter.release(_headers(max=10, remaining=5, interval_ms=500, daily_remaining=900), throttled=True)
        store = coordination.token_store(GRANT)
        with store.refresh_lock():
            store.save("seed", TokenState(refresh_token="r"))
            keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
            assert {k.decode().rsplit(":", 1)[-1] for k in keys} >= {
                "leases", "done", "limits", "blocked_until", "daily", GRANT, "lock"
            }  # fmt: skip
            assert all(redis_client.pttl(k) > 0 for k in keys), {k: redis_client.pttl(k) for k in keys}


PASSWORD = "s3cret-pw"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A Redis of this test alone (with a password), to kill."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [server, *args, "--requirepass", PASSWORD, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            probe.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"private redis-server on port {port} did not start")
            time.sleep(0.05)
    probe.close()
    yield proc, url
    proc.kill()
    proc.wait()


class TestRedisGoesAway:
    def test_every_entry_point_raises_instead_of_sending_alone(
        self, private_redis: tuple[subprocess.Popen[bytes], str]
    ) -> None:
        proc, url = private_redis
        coordination = RedisCoordination(redis_client_from_url(url, timeout_s=1), API, LOCATION)
        assert PASSWORD not in coordination.description
        limiter = coordination.limiter(LimitSettings(burst=1, interval_s=5, daily=100))
        store = coordination.token_store(GRANT)
        limiter.acquire()
        limiter.release()
        store.save("seed", TokenState(refresh_token="r"))
        outcome: list[object] = []
        waiting = threading.Thread(target=lambda: outcome.append(_outcome(limiter.acquire)))
        waiting.start()  # the window is full for 5 s: this one waits
        time.sleep(0.3)
        proc.kill()
        proc.wait()
        waiting.join(3)
        assert not waiting.is_alive(), "acquire hangs after Redis went away"
        assert isinstance(outcome[0], CoordinationError), outcome

        port = url.rsplit(":", 1)[1].split("/")[0]

        def lock() -> None:
            with store.refresh_lock():
                pass

        for call in (
            limiter.acquire,
            limiter.release,
            lambda: limiter.daily_remaining,
            lambda: store.load("seed"),
            lambda: store.save("seed", TokenState(refresh_token="r2")),
            lock,
        ):
            started = time.monotonic()
            error = _outcome(call)
            assert isinstance(error, CoordinationError), error
            assert f"127.0.0.1:{port} db 0" in str(error)
            assert PASSWORD not in str(error)
            assert time.monotonic() - started < 3

    def test_wrong_password_is_a_coordination_error_without_the_password(
        self, private_redis: tuple[subprocess.Popen[bytes], str]
    ) -> None:
        _, url = private_redis
        wrong = url.replace(PASSWORD, "wrong-pw")
        limiter = RedisCoordination(redis_client_from_url(wrong), API, LOCATION).limiter(LimitSettings())
        with pytest.raises(CoordinationError) as raised:
            limiter.acquire()
        assert "wrong-pw" not in str(raised.value)


def _outcome(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:
        return exc
