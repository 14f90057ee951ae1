"""Test helpers: run the sandbox in a subprocess and drive its ``/_sandbox`` admin API.

::

    with SandboxProcess(args=["--burst", "100000"]) as server:
        admin = SandboxAdmin(server.base_url)
        admin.reset()
        admin.put_location("loc1", allowDuplicateContact=False, duplicateCheckFields=["email", "phone"])
        admin.add_token(token="tok", locationId="loc1", scopes=["contacts.write"])
        agency = admin.create_agency("acme", locations=300, uninstalled=[7])
        # agency.token lists agency.location_ids (GET /oauth/installedLocations) and mints
        # location tokens for them (POST /oauth/locationToken)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class SandboxProcess:
    """``python -m growthhub_sandbox`` on a free loopback port; a real uvicorn, not an in-process app.

    :param args: extra command-line options (``--burst``, ``--config`` ...)
    :param startup_timeout: seconds to wait for ``/_sandbox/health``
    """

    def __init__(
        self, args: list[str] | None = None, *, host: str = "127.0.0.1", startup_timeout: float = 30
    ) -> None:
        self.args = list(args or [])
        self.host = host
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: str | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("SandboxProcess is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> SandboxProcess:
        # A port found free can be taken before the server binds it: try a few.
        for _attempt in range(3):
            if self._start_once():
                return self
        tail = self.log_tail()
        self._remove_log()
        raise RuntimeError(f"sandbox exited during startup; log:\n{tail}")

    def _start_once(self) -> bool:
        self._remove_log()
        self.port = free_port(self.host)
        fd, self.log_path = tempfile.mkstemp(prefix="growthhub-sandbox-", suffix=".log")
        # works from a checkout even before `pip install -e .`
        python_path = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path}
        cmd = [
            sys.executable,
            "-m",
            "growthhub_sandbox",
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.args,
        ]
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: S603
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if requests.get(f"{self.base_url}/_sandbox/health", timeout=1).ok:
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"sandbox not ready after {self.startup_timeout}s; log:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def _remove_log(self) -> None:
        if self.log_path and os.path.exists(self.log_path):
            os.remove(self.log_path)
        self.log_path = None

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it is still there after 10 s."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        self._remove_log()

    def __enter__(self) -> SandboxProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Agency:
    """A company made by ``SandboxAdmin.create_agency``: its app, OAuth agency token and locations."""

    company_id: str
    app_id: str
    token: str
    client_id: str
    client_secret: str
    refresh_token: str | None
    location_ids: tuple[str, ...]


class SandboxAdmin:
    """Small client of the ``/_sandbox`` admin API; every call raises on an HTTP error."""

    def __init__(self, base_url: str, *, timeout: float = 10) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        response = self.session.request(
            method, f"{self.base_url}/_sandbox{path}", json=json, timeout=self.timeout
        )
        response.raise_for_status()
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def reset(self) -> None:
        """Back to the server's startup config; contacts, limits, faults and stats cleared."""
        self._call("POST", "/reset")

    def put_location(self, location_id: str, **settings: Any) -> dict[str, Any]:
        """``allowDuplicateContact``, ``duplicateCheckFields``, ``customFields``, ``users``, ``rateLimit``."""
        return self._call("PUT", f"/locations/{location_id}", settings)

    def add_token(self, **token: Any) -> dict[str, Any]:
        """``token``, ``locationId``, ``scopes``, ``expiresIn``, ``refreshToken``, ``clientId``,
        ``clientSecret``; the location must exist. An agency token has ``userType="Company"`` and
        ``companyId`` instead of ``locationId``."""
        return self._call("POST", "/tokens", token)

    def put_company(self, company_id: str, **settings: Any) -> dict[str, Any]:
        """``appId``, ``locationTokenExpiresIn`` (lifetime of minted location tokens), ``locationScopes``."""
        return self._call("PUT", f"/companies/{company_id}", settings)

    def add_locations(self, company_id: str, count: int, **settings: Any) -> list[str]:
        """``count`` locations of the company at once; ``idPrefix``, ``uninstalled`` (indexes),
        ``location`` (a ``put_location`` body for all of them). Returns their ids in index order."""
        body = {"count": count, **settings}
        return self._call("POST", f"/companies/{company_id}/locations", body)["locationIds"]

    def create_agency(
        self,
        company_id: str = "agency",
        *,
        locations: int = 0,
        uninstalled: Sequence[int] = (),
        scopes: Sequence[str] = ("oauth.readonly", "oauth.write"),
        expires_in: float | None = None,
        refresh_token: str | None = None,
        location_token_expires_in: float | None = None,
        **location: Any,
    ) -> Agency:
        """A company with its app, an OAuth agency token (``expires_in``: its lifetime, None: never;
        ``refresh_token``: refreshable through ``/oauth/token``) and ``locations`` locations, the
        ``uninstalled`` indexes without the app; ``location`` settings (``rateLimit``,
        ``customFields`` ...) apply to every location."""
        app_id = f"{company_id}-app"
        company: dict[str, Any] = {"appId": app_id}
        if location_token_expires_in is not None:
            company["locationTokenExpiresIn"] = location_token_expires_in
        self.put_company(company_id, **company)
        agency = Agency(
            company_id=company_id,
            app_id=app_id,
            token=f"{company_id}-agency-token",
            client_id=f"{app_id}-client",
            client_secret=f"{app_id}-secret",
            refresh_token=refresh_token,
            location_ids=tuple(
                self.add_locations(company_id, locations, uninstalled=list(uninstalled), location=location)
                if locations
                else ()
            ),
        )
        self.add_token(
            token=agency.token,
            userType="Company",
            companyId=company_id,
            scopes=list(scopes),
            expiresIn=expires_in,
            refreshToken=refresh_token,
            clientId=agency.client_id,
            clientSecret=agency.client_secret,
        )
        return agency

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Replace all fault knobs (unset ones are off); see ``models.FaultConfig``."""
        return self._call("PUT", "/faults", faults)

    def contacts(self, location_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/locations/{location_id}/contacts")["contacts"]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def timeline(
        self, location_id: str, *, bucket_ms: int = 1000, endpoint: str | None = None
    ) -> list[dict[str, Any]]:
        """Answers to the location's authenticated requests per bucket: ``[{"start", "answers"}]``."""
        query = f"?bucketMs={bucket_ms}" + (f"&endpoint={quote(endpoint)}" if endpoint else "")
        return self._call("GET", f"/locations/{location_id}/timeline{query}")["buckets"]

    def close(self) -> None:
        self.session.close()
