"""The UI's *Test* button on a stored GrowthHub connection, through a real Airflow API server.

The server runs with the project's plugins folder (as ``docker-compose.yaml`` mounts it) and
``[core] test_connection = Enabled``. A connection is stored the way the UI's form stores it (port
hidden, so none), read back as the connections list reads it (password masked), and tested with
the body the list's Test button posts: every form field, ``port: 0`` (``Number(null)``), the
masked password.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from growthhub_provider.connection_test import ZeroPortIsBlankMiddleware
from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
LOCATION_ID = "demo-location"  # the sandbox's startup location
TOKEN = "sandbox-demo-token"


class ApiServer:
    """``airflow api-server`` on a free port; every caller is admin (simple auth manager)."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = home / "api-server.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))},
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__WORKERS": "1",
        }

    def start(self) -> subprocess.Popen[bytes]:
        migrate = subprocess.run(
            [AIRFLOW, "db", "migrate"], env=self.env, capture_output=True, timeout=180, check=False
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        with self.log.open("wb") as out:
            process = subprocess.Popen(
                [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=2).ok:
                    return process
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        process.kill()
        raise AssertionError(f"api-server did not start:\n{self.log.read_text()[-3000:]}")

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        return requests.request(method, f"{self.base_url}/api/v2{path}", json=body, timeout=60)


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("airflow_api_home"))
    process = server.start()
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _store(server: ApiServer, conn_id: str, base_url: str, token: str) -> None:
    """Add a connection as the UI's form does: hidden fields (port, login, schema) left out."""
    body = {
        "connection_id": conn_id,
        "conn_type": "growthhub",
        "host": base_url,
        "password": token,
        "extra": json.dumps({"location_id": LOCATION_ID, "timeout": 10}),
    }
    response = server.api("POST", "/connections", body)
    assert response.status_code == 201, response.text


def _test_like_the_ui(server: ApiServer, conn_id: str) -> requests.Response:
    """POST what the connections list's Test button posts for the row it shows."""
    shown = server.api("GET", f"/connections/{conn_id}").json()
    assert shown["port"] is None
    assert shown["password"] == "***"
    body = {
        "conn_type": shown["conn_type"],
        "connection_id": shown["connection_id"],
        "description": shown["description"] or "",
        "extra": shown["extra"] or "{}",
        "host": shown["host"] or "",
        "login": shown["login"] or "",
        "password": shown["password"] or "",
        "port": 0,  # Number(null)
        "schema": shown["schema"] or "",
    }
    return server.api("POST", "/connections/test", body)


@pytest.mark.integration
@pytest.mark.slow
def test_the_plugin_loads_without_errors(api_server: ApiServer) -> None:
    plugins = api_server.api("GET", "/plugins").json()["plugins"]
    errors = api_server.api("GET", "/plugins/importErrors").json()["import_errors"]

    assert "growthhub_connection_test" in {p["name"] for p in plugins}
    assert errors == []


@pytest.mark.integration
@pytest.mark.slow
def test_test_button_succeeds_on_a_stored_connection_with_a_good_token(
    api_server: ApiServer, sandbox: SandboxAdmin, sandbox_server: SandboxProcess
) -> None:
    _store(api_server, "growthhub_good", sandbox_server.base_url, TOKEN)

    response = _test_like_the_ui(api_server, "growthhub_good")

    assert response.status_code == 200, response.text
    assert response.json()["status"] is True, response.json()
    assert sandbox.stats()["requests"], "the test reached the sandbox with the stored token"


@pytest.mark.integration
@pytest.mark.slow
def test_test_button_names_the_rejected_token(
    api_server: ApiServer, sandbox: SandboxAdmin, sandbox_server: SandboxProcess
) -> None:
    _store(api_server, "growthhub_bad", sandbox_server.base_url, "not-a-valid-token")

    response = _test_like_the_ui(api_server, "growthhub_bad")

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] is False
    assert "401" in result["message"], result["message"]
    assert "not-a-valid-token" not in result["message"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_port_of_the_callers_choosing_still_needs_credentials(
    api_server: ApiServer, sandbox_server: SandboxProcess
) -> None:
    _store(api_server, "growthhub_moved", sandbox_server.base_url, TOKEN)
    shown = api_server.api("GET", "/connections/growthhub_moved").json()

    response = api_server.api("POST", "/connections/test", {**shown, "port": 8443})

    assert response.status_code == 400, response.text
    assert "differs from the stored connection" in response.text


# -- the middleware alone ---------------------------------------------------------------------------


async def _through_middleware(path: str, body: bytes) -> bytes:
    """The body a route behind :class:`ZeroPortIsBlankMiddleware` receives for ``POST path``."""
    received: list[bytes] = []

    async def route(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        length = dict(scope["headers"]).get(b"content-length")
        assert length == str(len(message["body"])).encode()
        received.append(message["body"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        raise AssertionError("the route sends nothing here")

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-length", str(len(body)).encode())],
    }
    await ZeroPortIsBlankMiddleware(route)(scope, receive, send)
    (out,) = received
    return out


@pytest.mark.parametrize(
    ("path", "body", "expected_port"),
    [
        ("/api/v2/connections/test", {"connection_id": "c", "port": 0}, None),
        ("/api/v2/connections/test", {"connection_id": "c", "port": 443}, 443),
        ("/api/v2/connections/test", {"connection_id": "c"}, "absent"),
        ("/api/v2/connections", {"connection_id": "c", "port": 0}, 0),
    ],
    ids=["test-port-0", "test-real-port", "test-no-port", "other-route"],
)
def test_middleware_blanks_only_a_zero_port_of_a_connection_test(
    path: str, body: dict[str, Any], expected_port: Any
) -> None:
    import asyncio

    out = json.loads(asyncio.run(_through_middleware(path, json.dumps(body).encode())))

    assert out.get("port", "absent") == expected_port
    assert out["connection_id"] == "c"
