"""
The GrowthHub client on its own, against the sandbox: no Airflow connection, no hook.

Several clients stand for several workers of one location. With a coordination they share, they
share one OAuth token state: exactly one of them spends each refresh token, the others read the
new access token. Per backend: ``local`` (one token file on one host) and ``redis``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from growthhub_provider.client import (
    ClientConfig,
    CoordinationError,
    GrowthHubClient,
    LimitSettings,
    LocalCoordination,
    OAuthCredentials,
    RetryPolicy,
)
from growthhub_provider.client.redis_coordination import RedisCoordination, redis_client_from_url
from growthhub_sandbox.testing import free_port

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from growthhub_provider.client import Coordination
    from growthhub_sandbox.testing import SandboxAdmin

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("GROWTHHUB_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
LOCATION = "loc-client"
TOKEN = "pit-client-token-0001"
FAST = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05)
UNLIMITED = {"burst": 1_000_000, "intervalMs": 1000, "daily": 1_000_000}


def rows(n: int, prefix: str = "p") -> list[tuple[str, dict[str, Any]]]:
    return [(f"{prefix}-{i}", {"email": f"{prefix}.{i}@example.com", "firstName": f"N{i}"}) for i in range(n)]


@pytest.fixture
def location(sandbox: SandboxAdmin) -> SandboxAdmin:
    sandbox.put_location(LOCATION, duplicateCheckFields=["email", "phone"], rateLimit=UNLIMITED)
    sandbox.add_token(token=TOKEN, locationId=LOCATION, scopes=["contacts.write", "contacts.readonly"])
    return sandbox


@pytest.fixture
def coordination_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[str, str], Coordination]:
    """``make(backend, base_url)``: a coordination of the location, as one worker would build it."""
    prefix = f"test-client-{uuid.uuid4().hex[:8]}"
    clients = []

    def make(backend: str, base_url: str) -> Coordination:
        if backend == "local":
            return LocalCoordination(base_url, LOCATION, tmp_path / "tokens.json")
        client = redis_client_from_url(REDIS_URL)
        clients.append(client)
        # The lock outlives a refresh request (timeout 5 s), as the hook sets it.
        return RedisCoordination(client, base_url, LOCATION, key_prefix=prefix, lock_ttl_s=15)

    yield make
    for client in clients[:1]:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)


def test_the_client_imports_no_airflow() -> None:
    code = (
        "import sys, growthhub_provider.client, growthhub_provider.client.redis_coordination;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_upserts_with_nothing_but_a_config(location: SandboxAdmin, tmp_path: Path) -> None:
    config = ClientConfig(base_url=location.base_url, token=TOKEN, location_id=LOCATION, retry=FAST)
    client = GrowthHubClient(
        config, coordination=LocalCoordination(location.base_url, LOCATION, tmp_path / "t")
    )
    outcomes = list(client.upsert_contacts(rows(30)))
    assert sorted(o.status for o in outcomes) == ["created"] * 30
    again = client.upsert_contact({"email": "p.0@example.com", "lastName": "Lee"})
    assert not again.new
    assert again.contact_id == next(o.contact_id for o in outcomes if o.key == "p-0")
    assert client.last_batch_stats is not None
    assert client.last_batch_stats.created == 30
    assert len(location.contacts(LOCATION)) == 30


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_workers_sharing_a_coordination_spend_each_refresh_token_once(
    location: SandboxAdmin, coordination_factory: Callable[[str, str], Coordination], backend: str
) -> None:
    """Four clients, access tokens living 1 s, 4 s of upserts: one refresh per expiry, none reused."""
    seed = f"rt-seed-{backend}"
    location.add_token(
        token=f"at-first-{backend}",
        locationId=LOCATION,
        expiresIn=1,
        refreshToken=seed,
        clientId="cid-shared",
        clientSecret="csecret-shared",
    )
    oauth = OAuthCredentials("cid-shared", "csecret-shared", seed)
    clients = [
        GrowthHubClient(
            ClientConfig(
                base_url=location.base_url,
                name="growthhub_default",
                location_id=LOCATION,
                oauth=oauth,
                max_workers=4,
                timeout=5,
                retry=FAST,
            ),
            coordination=coordination_factory(backend, location.base_url),
        )
        for _ in range(4)
    ]
    deadline = time.monotonic() + 4
    statuses: list[str] = []
    errors: list[BaseException] = []

    def work(n: int, client: GrowthHubClient) -> None:
        batch = 0
        try:
            while time.monotonic() < deadline:
                statuses.extend(o.status for o in client.upsert_contacts(rows(8, f"w{n}b{batch}")))
                batch += 1
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n, c)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert not errors
    assert set(statuses) == {"created"}
    refreshes = location.stats()["requests"]["POST /oauth/token"]
    assert set(refreshes) == {"200"}, f"a spent refresh token was sent again: {refreshes}"
    # 4 s of 1-s tokens: about one refresh per second, not one per client and expiry.
    assert 3 <= refreshes["200"] <= 7


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_a_seed_set_anew_by_an_admin_wins_over_the_stored_rotation(
    location: SandboxAdmin, coordination_factory: Callable[[str, str], Coordination], backend: str
) -> None:
    for seed in ("rt-old-seed", "rt-new-seed"):
        location.add_token(
            token=f"at-for-{seed}",
            locationId=LOCATION,
            expiresIn=3600,
            refreshToken=seed,
            clientId="cid-admin",
            clientSecret="csecret-admin",
        )

    def client(seed: str) -> GrowthHubClient:
        config = ClientConfig(
            base_url=location.base_url,
            location_id=LOCATION,
            oauth=OAuthCredentials("cid-admin", "csecret-admin", seed),
            retry=FAST,
        )
        return GrowthHubClient(config, coordination=coordination_factory(backend, location.base_url))

    assert client("rt-old-seed").upsert_contact({"email": "old@example.com"}).new
    assert client("rt-new-seed").upsert_contact({"email": "new@example.com"}).new
    # Both seeds were spent once, each by the first client that held it: nothing sent twice.
    assert location.stats()["requests"]["POST /oauth/token"] == {"200": 2}


@pytest.fixture
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis of this test's own, so the test can take it away."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis_client_from_url(url).ping()
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url, proc
    proc.kill()
    proc.wait()


def test_redis_going_away_mid_batch_stops_the_batch_with_a_clear_error(
    location: SandboxAdmin, private_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """Never a burst of unlimited requests: once Redis is gone, nothing more is sent."""
    url, redis_proc = private_redis
    location.put_location(
        LOCATION,
        duplicateCheckFields=["email", "phone"],
        rateLimit={"burst": 20, "intervalMs": 500, "daily": 10**6},
    )
    coordination = RedisCoordination(redis_client_from_url(url), location.base_url, LOCATION, lock_ttl_s=5)
    config = ClientConfig(
        base_url=location.base_url,
        token=TOKEN,
        location_id=LOCATION,
        limits=LimitSettings(burst=20, interval_s=0.5),
        max_workers=8,
        retry=FAST,
    )
    client = GrowthHubClient(config, coordination=coordination)
    outcomes = []
    sent_when_killed = 0

    def consume() -> None:
        nonlocal sent_when_killed
        for outcome in client.upsert_contacts(rows(400)):
            outcomes.append(outcome)
            if len(outcomes) == 30:
                redis_proc.kill()
                redis_proc.wait()
                sent_when_killed = sum(location.stats()["requests"]["POST /contacts/upsert"].values())

    with pytest.raises(CoordinationError, match=r"redis 127\.0\.0\.1:\d+ db 0"):
        consume()
    sent = sum(location.stats()["requests"]["POST /contacts/upsert"].values())
    # What was in flight when Redis died may still land (at most one request per worker thread).
    assert sent <= sent_when_killed + config.max_workers
