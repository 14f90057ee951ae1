"""
CPU per request of the client's transport against a requests session: one thread, one keep-alive
connection, the sandbox answering an upsert (JSON body parsed, rate-limit headers read).

The floor under ``bench/bench_fleet_client.py``'s figure: what sending costs before threads,
limiter and retries add theirs.

Usage::

    python bench/bench_transport.py               # 3 rounds of 2,000 requests each way
    python bench/bench_transport.py --requests 500 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import requests

from growthhub_provider.client.transport import Transport
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

LOCATION = "transport-bench"
HEADERS = {
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
    "Authorization": f"Bearer tok-{LOCATION}",
    "Content-Type": "application/json",
    "Version": "2021-07-28",
}


def _cpu_ms_per_request(send: Callable[[int], object], count: int) -> float:
    """Thread CPU of ``count`` sends (the sandbox's CPU is another process's)."""
    started = time.thread_time()
    for i in range(count):
        send(i)
    return 1000 * (time.thread_time() - started) / count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with SandboxProcess(args=["--log-level", "warning", "--burst", "1000000000"]) as server:
        admin = SandboxAdmin(server.base_url)
        admin.reset()
        admin.put_location(LOCATION)
        admin.add_token(token=f"tok-{LOCATION}", locationId=LOCATION, scopes=["contacts.write"])
        url = f"{server.base_url}/contacts/upsert"
        transport = Transport(timeout=30, verify=True, proxies={})
        session = requests.Session()
        session.trust_env = False

        def body(i: int) -> bytes:
            return json.dumps({"email": f"u{i % 500}@example.com", "locationId": LOCATION}).encode()

        def via_transport(i: int) -> object:
            answer = transport.request("POST", url, HEADERS, body(i))
            return answer.json(), answer.headers.get("X-RateLimit-Remaining")

        def via_requests(i: int) -> object:
            response = session.post(url, data=body(i), headers=HEADERS, timeout=30)
            return response.json(), response.headers.get("X-RateLimit-Remaining")

        _cpu_ms_per_request(via_transport, 200)  # warm: connection, sandbox caches
        _cpu_ms_per_request(via_requests, 200)
        for round_number in range(1, args.rounds + 1):
            ours = _cpu_ms_per_request(via_transport, args.requests)
            theirs = _cpu_ms_per_request(via_requests, args.requests)
            print(f"round {round_number}: transport {ours:.3f} ms/request, requests Session {theirs:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
