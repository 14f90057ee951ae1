"""Agency contract: GET /oauth/installedLocations, POST /oauth/locationToken and their admin calls."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests

from growthhub_sandbox.testing import Agency, SandboxAdmin, SandboxProcess

VERSION = "2023-02-21"
NOT_INSTALLED = "The app is not installed for this location."


class AgencyApi:
    """The two agency endpoints, plus an upsert with a minted token, against one server."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    @staticmethod
    def headers(token: str | None) -> dict[str, str]:
        return {"Version": VERSION, **({"Authorization": f"Bearer {token}"} if token else {})}

    def installed(self, agency: Agency, token: str | None = None, **params: Any) -> requests.Response:
        query = {"companyId": agency.company_id, "appId": agency.app_id, **params}
        return requests.get(
            f"{self.base_url}/oauth/installedLocations",
            params={k: v for k, v in query.items() if v is not None},
            headers=self.headers(token or agency.token),
            timeout=10,
        )

    def mint(
        self, agency: Agency, location_id: str | None, token: str | None = None, **form: str | None
    ) -> requests.Response:
        body = {"companyId": agency.company_id, "locationId": location_id, **form}
        return requests.post(
            f"{self.base_url}/oauth/locationToken",
            data={k: v for k, v in body.items() if v is not None},
            headers=self.headers(token or agency.token),
            timeout=10,
        )

    def minted_token(self, agency: Agency, location_id: str) -> str:
        response = self.mint(agency, location_id)
        assert response.status_code == 201, response.text
        return response.json()["access_token"]

    def upsert(self, token: str, location_id: str, **fields: Any) -> requests.Response:
        body = {"locationId": location_id, "email": "ada@example.com", **fields}
        return requests.post(
            f"{self.base_url}/contacts/upsert", json=body, headers=self.headers(token), timeout=10
        )


@pytest.fixture
def agency_api(sandbox_server: SandboxProcess) -> AgencyApi:
    return AgencyApi(sandbox_server.base_url)


@pytest.fixture
def acme(sandbox: SandboxAdmin) -> Agency:
    """45 locations, index 3 without the app; a second agency exists next to it."""
    sandbox.create_agency("globex", locations=2)
    return sandbox.create_agency("acme", locations=45, uninstalled=[3])


def _ids(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [location["_id"] for location in response.json()["locations"]]


class TestInstalledLocations:
    def test_pages_cover_all_the_companys_locations_once_with_the_total_count(self, agency_api, acme):
        pages = [agency_api.installed(acme, skip=skip, limit=20) for skip in (0, 20, 40)]
        assert [len(_ids(page)) for page in pages] == [20, 20, 5]
        assert {page.json()["count"] for page in pages} == {45}
        assert [i for page in pages for i in _ids(page)] == list(acme.location_ids)

    def test_limit_defaults_to_20(self, agency_api, acme):
        assert _ids(agency_api.installed(acme)) == list(acme.location_ids[:20])

    def test_each_location_has_id_name_address_and_installed_flag(self, agency_api, acme):
        locations = agency_api.installed(acme, limit=5).json()["locations"]
        assert locations[3] == {
            "_id": acme.location_ids[3],
            "name": acme.location_ids[3],
            "address": "",
            "isInstalled": False,
        }
        assert [loc["isInstalled"] for loc in locations] == [True, True, True, False, True]

    def test_is_installed_filters_and_counts_the_filtered_locations(self, agency_api, acme):
        installed = agency_api.installed(acme, isInstalled="true", limit=100)
        assert installed.json()["count"] == 44
        assert _ids(installed) == [i for n, i in enumerate(acme.location_ids) if n != 3]
        uninstalled = agency_api.installed(acme, isInstalled="false")
        assert (_ids(uninstalled), uninstalled.json()["count"]) == ([acme.location_ids[3]], 1)

    def test_a_readonly_agency_token_may_list(self, agency_api, sandbox):
        reader = sandbox.create_agency("reader", locations=1, scopes=["oauth.readonly"])
        assert _ids(agency_api.installed(reader)) == list(reader.location_ids)

    @pytest.mark.parametrize(
        ("params", "messages"),
        [
            ({"limit": 101}, ["limit must not be greater than 100"]),
            ({"limit": 0, "skip": -1}, ["skip must not be less than 0", "limit must not be less than 1"]),
            ({"limit": "ten"}, ["limit must be an integer number"]),
            ({"isInstalled": "yes"}, ["isInstalled must be a boolean value"]),
            (
                {"companyId": None, "appId": " "},
                ["companyId should not be empty", "appId should not be empty"],
            ),
        ],
    )
    def test_bad_query_is_422_with_one_message_per_problem(self, agency_api, acme, params, messages):
        response = agency_api.installed(acme, **params)
        assert response.status_code == 422
        assert response.json() == {"statusCode": 422, "message": messages, "error": "Unprocessable Entity"}

    @pytest.mark.parametrize(
        ("params", "message"),
        [
            (
                {"companyId": "globex", "appId": "globex-app"},
                "The token does not have access to this company.",
            ),
            ({"appId": "globex-app"}, "The app does not belong to this company."),
        ],
    )
    def test_another_company_or_app_is_403(self, agency_api, acme, params, message):
        response = agency_api.installed(acme, **params)
        assert response.status_code == 403
        assert response.json() == {"statusCode": 403, "message": message, "error": "Forbidden"}

    def test_version_header_is_required(self, acme, sandbox_server):
        response = requests.get(
            f"{sandbox_server.base_url}/oauth/installedLocations",
            params={"companyId": acme.company_id, "appId": acme.app_id},
            headers={"Authorization": f"Bearer {acme.token}"},
            timeout=10,
        )
        assert response.status_code == 400


class TestLocationToken:
    def test_minted_token_is_a_location_token_of_that_location(self, agency_api, acme):
        response = agency_api.mint(acme, acme.location_ids[0])
        assert response.status_code == 201
        body = response.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 86_399
        assert set(body["scope"].split()) == {"contacts.write", "contacts.readonly"}
        assert (body["locationId"], body["userType"], body["companyId"]) == (
            acme.location_ids[0],
            "Location",
            "acme",
        )

    def test_minted_token_upserts_into_its_own_location_only(self, agency_api, acme, sandbox):
        token = agency_api.minted_token(acme, acme.location_ids[0])
        assert agency_api.upsert(token, acme.location_ids[0]).status_code == 200
        other = agency_api.upsert(token, acme.location_ids[1])
        assert (other.status_code, other.json()["message"]) == (
            403,
            "The token does not have access to this location.",
        )
        assert [len(sandbox.contacts(i)) for i in acme.location_ids[:2]] == [1, 0]

    def test_minted_token_has_its_locations_rate_limit(self, agency_api, sandbox):
        agency = sandbox.create_agency("tight", locations=1, rateLimit={"burst": 2, "intervalMs": 60_000})
        token = agency_api.minted_token(agency, agency.location_ids[0])
        statuses = [agency_api.upsert(token, agency.location_ids[0]).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]

    def test_minted_token_expires_after_the_companys_ttl(self, agency_api, sandbox):
        agency = sandbox.create_agency("brief", locations=1, location_token_expires_in=1)
        response = agency_api.mint(agency, agency.location_ids[0])
        assert response.json()["expires_in"] == 1
        token = response.json()["access_token"]
        assert agency_api.upsert(token, agency.location_ids[0]).status_code == 200
        time.sleep(1.1)
        assert agency_api.upsert(token, agency.location_ids[0]).status_code == 401

    def test_agency_token_does_not_reach_contacts(self, agency_api, acme):
        assert agency_api.upsert(acme.token, acme.location_ids[0]).status_code == 403

    @pytest.mark.parametrize(
        "location_id",
        ["acme-loc-03", "no-such-location", "globex-loc-0"],
        ids=["uninstalled", "unknown", "other-companys"],
    )
    def test_location_without_the_app_is_403_alike(self, agency_api, acme, location_id):
        assert acme.location_ids[3] == "acme-loc-03"
        response = agency_api.mint(acme, location_id)
        assert response.status_code == 403
        assert response.json() == {"statusCode": 403, "message": NOT_INSTALLED, "error": "Forbidden"}

    def test_another_company_is_403(self, agency_api, acme):
        response = agency_api.mint(acme, "globex-loc-0", companyId="globex")
        assert (response.status_code, response.json()["message"]) == (
            403,
            "The token does not have access to this company.",
        )

    @pytest.mark.parametrize(
        ("token", "message"),
        [
            ("location-oauth", "This authClass type is not allowed to access this scope."),
            (
                "company-static",
                "Private integration tokens cannot be used here; use the agency's OAuth token.",
            ),
            ("company-readonly", "The token is not authorized for this scope."),
        ],
    )
    def test_only_an_oauth_agency_token_with_oauth_write_mints(
        self, agency_api, acme, sandbox, token, message
    ):
        sandbox.add_token(token="location-oauth", locationId=acme.location_ids[0], clientId="acme-app-client")
        sandbox.add_token(
            token="company-static", userType="Company", companyId="acme", scopes=["oauth.write"]
        )
        sandbox.add_token(
            token="company-readonly",
            userType="Company",
            companyId="acme",
            scopes=["oauth.readonly"],
            clientId="c",
        )
        response = agency_api.mint(acme, acme.location_ids[0], token=token)
        assert response.status_code == 403
        assert response.json() == {"statusCode": 403, "message": message, "error": "Forbidden"}

    @pytest.mark.parametrize(
        ("form", "messages"),
        [
            ({"companyId": "  "}, ["companyId should not be empty"]),
            ({"locationId": None}, ["locationId should not be empty"]),
            (
                {"companyId": None, "locationId": ""},
                ["companyId should not be empty", "locationId should not be empty"],
            ),
        ],
    )
    def test_missing_or_blank_fields_are_422_with_one_message_each(self, agency_api, acme, form, messages):
        response = agency_api.mint(acme, acme.location_ids[0], **form)
        assert response.status_code == 422
        assert response.json() == {"statusCode": 422, "message": messages, "error": "Unprocessable Entity"}

    @pytest.mark.parametrize("token", [None, "never-issued"])
    def test_missing_or_unknown_token_is_401(self, agency_api, acme, sandbox_server, token):
        response = requests.post(
            f"{sandbox_server.base_url}/oauth/locationToken",
            data={"companyId": "acme", "locationId": acme.location_ids[0]},
            headers=AgencyApi.headers(token),
            timeout=10,
        )
        assert response.status_code == 401
        assert response.json()["message"] == "Invalid token: access token is invalid"

    def test_expired_agency_token_is_401_until_refreshed_as_company(
        self, agency_api, sandbox, sandbox_server
    ):
        agency = sandbox.create_agency("lapsed", locations=1, expires_in=0.5, refresh_token="lapsed-refresh")
        time.sleep(0.6)
        assert agency_api.mint(agency, agency.location_ids[0]).status_code == 401
        grant = {
            "grant_type": "refresh_token",
            "client_id": agency.client_id,
            "client_secret": agency.client_secret,
            "refresh_token": "lapsed-refresh",
        }
        url = f"{sandbox_server.base_url}/oauth/token"
        as_location = requests.post(url, data={**grant, "user_type": "Location"}, timeout=10)
        assert (as_location.status_code, as_location.json()["error"]) == (400, "invalid_request")
        refreshed = requests.post(url, data={**grant, "user_type": "Company"}, timeout=10).json()
        assert (refreshed["userType"], refreshed["companyId"]) == ("Company", "lapsed")
        assert "locationId" not in refreshed
        assert (
            agency_api.mint(agency, agency.location_ids[0], token=refreshed["access_token"]).status_code
            == 201
        )


class TestAgencyAdmin:
    def test_bulk_creates_300_locations_with_their_settings(self, agency_api, sandbox):
        agency = sandbox.create_agency(
            "big",
            locations=300,
            uninstalled=[0, 299],
            customFields=[{"id": "cf-tier", "key": "tier", "dataType": "TEXT"}],
        )
        assert len(set(agency.location_ids)) == 300
        assert (agency.location_ids[0], agency.location_ids[-1]) == ("big-loc-000", "big-loc-299")
        assert agency_api.installed(agency, isInstalled="true").json()["count"] == 298
        token = agency_api.minted_token(agency, agency.location_ids[150])
        custom = [{"key": "tier", "field_value": "gold"}]
        assert agency_api.upsert(token, agency.location_ids[150], customFields=custom).status_code == 200
        contact = sandbox.contacts(agency.location_ids[150])[0]
        assert contact["customFields"] == [{"id": "cf-tier", "value": "gold"}]

    def test_locations_of_an_unknown_company_are_refused(self, sandbox):
        with pytest.raises(requests.HTTPError) as refused:
            sandbox.add_locations("nobody", 3)
        assert refused.value.response.status_code == 404

    def test_agency_token_of_an_unknown_company_is_refused(self, sandbox):
        with pytest.raises(requests.HTTPError) as refused:
            sandbox.add_token(token="t", userType="Company", companyId="nobody")
        assert refused.value.response.status_code == 404

    def test_put_location_moves_a_location_into_a_company_and_installs_the_app(self, agency_api, sandbox):
        agency = sandbox.create_agency("solo")
        sandbox.put_location(
            "standalone", companyId="solo", isInstalled=True, name="Standalone", address="1 Main St"
        )
        listed = agency_api.installed(agency).json()
        assert listed == {
            "locations": [
                {"_id": "standalone", "name": "Standalone", "address": "1 Main St", "isInstalled": True}
            ],
            "count": 1,
        }

    def test_reset_forgets_companies(self, agency_api, acme, sandbox):
        sandbox.reset()
        assert agency_api.mint(acme, acme.location_ids[0]).status_code == 401
        with pytest.raises(requests.HTTPError):
            sandbox.add_locations("acme", 1)

    def test_state_file_keeps_companies_locations_and_agency_tokens(self, tmp_path):
        state = ["--state", str(tmp_path / "state.db")]
        with SandboxProcess(args=state) as server:
            agency = SandboxAdmin(server.base_url).create_agency("kept", locations=3, uninstalled=[1])
        with SandboxProcess(args=state) as server:
            api = AgencyApi(server.base_url)
            assert api.installed(agency, isInstalled="true").json()["count"] == 2
            token = api.minted_token(agency, agency.location_ids[2])
            assert api.upsert(token, agency.location_ids[2]).status_code == 200

    def test_config_file_defines_companies_and_reset_restores_them(self, tmp_path):
        config = tmp_path / "sandbox.json"
        config.write_text(
            json.dumps(
                {
                    "companies": {"cfg": {"appId": "cfg-app", "locationTokenExpiresIn": 60}},
                    "locations": {"cfg-loc": {"companyId": "cfg"}},
                    "tokens": [
                        {
                            "token": "cfg-agency",
                            "userType": "Company",
                            "companyId": "cfg",
                            "clientId": "cfg-client",
                            "scopes": ["oauth.write"],
                        }
                    ],
                }
            )
        )
        agency = Agency("cfg", "cfg-app", "cfg-agency", "cfg-client", "", None, ("cfg-loc",))
        with SandboxProcess(args=["--config", str(config)]) as server:
            SandboxAdmin(server.base_url).reset()
            api = AgencyApi(server.base_url)
            assert _ids(api.installed(agency)) == ["cfg-loc"]
            assert api.mint(agency, "cfg-loc").json()["expires_in"] == 60
