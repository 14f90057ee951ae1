"""Fixtures shared by every test suite: one sandbox server per session, reset per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from growthhub_provider.client.coordination import forget_local_limiters
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

# High enough that no suite is throttled unless it configures a location's rateLimit itself.
UNTHROTTLED = ["--burst", "1000000000", "--daily", "1000000000", "--log-level", "warning"]


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


@pytest.fixture(autouse=True)
def _own_rate_limiters() -> Iterator[None]:
    """Local limiters are shared per process and location; a test must not inherit another's window."""
    forget_local_limiters()
    yield
    forget_local_limiters()
