"""Fixtures shared by every test suite: one sandbox server per session, reset per test."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from scripted_http import ScriptedApi, serve

from growthhub_provider.client.coordination import forget_local_limiters
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

# High enough that no suite is throttled unless it configures a location's rateLimit itself.
UNTHROTTLED = ["--burst", "1000000000", "--daily", "1000000000", "--log-level", "warning"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test`` runs two workers) the end-to-end tests run one after the
    other on one worker: each drives a whole Airflow stack, and two at once would fight over the
    machine's cores. The other worker takes everything else."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.xdist_group("e2e"))


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxProcess]:
    """A real sandbox (uvicorn in a subprocess) on a free loopback port."""
    with SandboxProcess(args=UNTHROTTLED) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxProcess) -> Iterator[SandboxAdmin]:
    """The session's sandbox, reset to its startup config (only ``demo-location``)."""
    admin = SandboxAdmin(sandbox_server.base_url)
    admin.reset()
    yield admin
    admin.close()


@pytest.fixture
def scripted_api() -> Iterator[ScriptedApi]:
    """A scripted HTTP server on a free loopback port (see tests/scripted_http.py)."""
    yield from serve()


@pytest.fixture(autouse=True)
def _own_rate_limiters() -> Iterator[None]:
    """Local limiters are shared per process and location; a test must not inherit another's window."""
    forget_local_limiters()
    yield
    forget_local_limiters()


class StatsdListener:
    """A StatsD server as far as a client can tell: a UDP socket on a free loopback port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received: list[str] = []

    def lines(self, wait_s: float = 0.5) -> list[str]:
        """Every metric line received so far: ``name:value|type``; waits ``wait_s`` for stragglers."""
        self.sock.settimeout(wait_s)
        try:
            while True:
                self.received.extend(self.sock.recv(65535).decode().splitlines())
        except TimeoutError:
            return self.received


@pytest.fixture
def statsd_listener() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.sock.close()
