"""Sustained upserts/s of the GrowthHub sandbox on loopback, with concurrent clients and no limits.

Starts its own sandbox process (or uses ``--url``), then runs ``--clients`` threads, each with
its own keep-alive connection, upserting distinct contacts until ``--seconds`` have passed or
``--max-requests`` were sent. Every 10th upsert repeats an earlier identity so the update path is
measured too.

The default client is the standard library's ``http.client``: ``requests`` costs about 1 ms of
CPU per request on this machine, so with it the benchmark measures the client (a bare ASGI app
also stops at ~900/s). ``--client requests`` shows that figure.

    .venv/bin/python bench/bench_sandbox.py --clients 32 --seconds 10
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

LOCATION = "bench-location"
TOKEN = "bench-token"
NO_LIMITS = ["--burst", "1000000000", "--daily", "1000000000", "--log-level", "warning"]


def run(
    base_url: str, clients: int, seconds: float, max_requests: int, client_kind: str = "http.client"
) -> dict[str, float | int]:
    admin = SandboxAdmin(base_url)
    admin.reset()
    admin.put_location(
        LOCATION, rateLimit={"burst": 1_000_000_000, "intervalMs": 10_000, "daily": 1_000_000_000}
    )
    admin.add_token(token=TOKEN, locationId=LOCATION, scopes=["contacts.write"])
    headers = {"Authorization": f"Bearer {TOKEN}", "Version": "2023-02-21"}
    url = f"{base_url}/contacts/upsert"

    sent = 0
    count_lock = threading.Lock()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.monotonic() + seconds

    def bodies(n: int) -> Iterator[dict[str, object]]:
        nonlocal sent
        i = 0
        while time.monotonic() < stop_at:
            with count_lock:
                if sent >= max_requests:
                    return
                sent += 1
            identity = i - 5 if i % 10 == 9 else i
            yield {
                "locationId": LOCATION,
                "email": f"c{n}-{identity}@example.com",
                "phone": f"+1650{200 + n}{identity % 10_000:04d}",
                "firstName": "Bench",
                "lastName": f"Client{n}",
                "tags": ["bench"],
            }
            i += 1

    def requests_client(n: int) -> None:
        with requests.Session() as session:
            for body in bodies(n):
                t0 = time.perf_counter()
                response = session.post(url, json=body, headers=headers, timeout=10)
                latencies[n].append(time.perf_counter() - t0)
                errors[n] += response.status_code != 200

    def stdlib_client(n: int) -> None:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        send_headers = {**headers, "Content-Type": "application/json"}
        try:
            for body in bodies(n):
                t0 = time.perf_counter()
                conn.request("POST", parts.path, body=json.dumps(body), headers=send_headers)
                response = conn.getresponse()
                response.read()
                latencies[n].append(time.perf_counter() - t0)
                errors[n] += response.status != 200
        finally:
            conn.close()

    client = requests_client if client_kind == "requests" else stdlib_client
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = sorted(x for per_client in latencies for x in per_client)
    quantiles = statistics.quantiles(flat, n=100)
    print(f"client: {client_kind}")
    return {
        "clients": clients,
        "requests": len(flat),
        "non_200": sum(errors),
        "seconds": elapsed,
        "upserts_per_s": len(flat) / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p95_ms": quantiles[94] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "contacts": len(admin.contacts(LOCATION)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running sandbox (its state is reset!)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--client", choices=["http.client", "requests"], default="http.client")
    args = parser.parse_args()
    if args.url:
        result = run(args.url, args.clients, args.seconds, args.max_requests, args.client)
    else:
        with SandboxProcess(args=NO_LIMITS) as server:
            result = run(server.base_url, args.clients, args.seconds, args.max_requests, args.client)
    width = max(len(k) for k in result)
    print(f"{'metric':<{width}}  value")
    for key, value in result.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
