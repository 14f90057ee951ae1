"""A configured test location plus a thin client of the public API, for the sandbox's own tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

LOCATION = "loc-test"
OTHER_LOCATION = "loc-other"
TOKEN = "tok-test"
VERSION = "2023-02-21"
CUSTOM_FIELDS = [
    {"id": "cf-text", "key": "favourite_color", "dataType": "TEXT"},
    {
        "id": "cf-option",
        "key": "plan",
        "dataType": "SINGLE_OPTIONS",
        "options": ["My Selected Option", "Basic"],
    },
    {"id": "cf-number", "key": "score", "dataType": "NUMERICAL"},
    {"id": "cf-money", "key": "price", "dataType": "MONETORY"},
    {"id": "cf-list", "key": "interests", "dataType": "MULTIPLE_OPTIONS"},
    {"id": "cf-file", "key": "photo", "dataType": "FILE_UPLOAD"},
]


class Api:
    """The public endpoints with the test token and Version header unless told otherwise."""

    location = LOCATION
    other_location = OTHER_LOCATION
    token = TOKEN
    version = VERSION

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.session = requests.Session()

    def headers(self, token: str | None = TOKEN, version: str | None = VERSION) -> dict[str, str]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if version is not None:
            headers["Version"] = version
        return headers

    def upsert(
        self, body: Any = None, *, token: str | None = TOKEN, version: str | None = VERSION, **kwargs: Any
    ) -> requests.Response:
        """POST /contacts/upsert; a dict body gets ``locationId`` unless it has one."""
        if isinstance(body, dict) and "locationId" not in body:
            body = {"locationId": LOCATION, **body}
        if "data" not in kwargs:
            kwargs["json"] = body
        kwargs.setdefault("timeout", 10)
        return self.session.post(
            f"{self.base_url}/contacts/upsert", headers=self.headers(token, version), **kwargs
        )

    def contact(self, contact_id: str, *, token: str | None = TOKEN, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.get(
            f"{self.base_url}/contacts/{contact_id}", headers=self.headers(token), **kwargs
        )

    def delete(self, contact_id: str, *, token: str | None = TOKEN, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return self.session.delete(
            f"{self.base_url}/contacts/{contact_id}", headers=self.headers(token), **kwargs
        )

    def oauth(self, **form: str) -> requests.Response:
        return self.session.post(f"{self.base_url}/oauth/token", data=form, timeout=10)


@pytest.fixture
def location(sandbox: SandboxAdmin) -> str:
    """``loc-test`` (duplicates not allowed, email then phone) with ``tok-test``, and ``loc-other``."""
    sandbox.put_location(LOCATION, users=["user-1"], customFields=CUSTOM_FIELDS)
    sandbox.add_token(token=TOKEN, locationId=LOCATION, scopes=["contacts.write", "contacts.readonly"])
    sandbox.put_location(OTHER_LOCATION)
    sandbox.add_token(token="tok-other", locationId=OTHER_LOCATION)
    return LOCATION


@pytest.fixture
def api(sandbox_server: SandboxProcess, location: str) -> Iterator[Api]:
    client = Api(sandbox_server.base_url)
    yield client
    client.session.close()
