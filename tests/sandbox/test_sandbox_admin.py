"""The /_sandbox admin API, the OpenAPI document, and the command line (config, state, versions)."""

from __future__ import annotations

import json

import pytest
import requests
import yaml

from growthhub_sandbox.testing import SandboxAdmin, SandboxProcess

pytestmark = pytest.mark.integration

HEADERS = {"Authorization": "Bearer tok-cfg", "Version": "2023-02-21"}


class TestAdminApi:
    def test_health(self, sandbox):
        assert sandbox.health() == {"status": "ok"}

    def test_reset_restores_the_startup_config(self, api, sandbox):
        api.upsert({"email": "r@example.com"})
        sandbox.reset()
        with pytest.raises(requests.HTTPError):
            sandbox.contacts(api.location)
        assert sandbox.contacts("demo-location") == []

    def test_demo_location_and_token_work_out_of_the_box(self, api, sandbox):
        headers = {"Authorization": "Bearer sandbox-demo-token", "Version": "2023-02-21"}
        body = {"locationId": "demo-location", "email": "demo@example.com"}
        response = requests.post(f"{api.base_url}/contacts/upsert", json=body, headers=headers, timeout=10)
        assert response.status_code == 200
        assert [c["email"] for c in sandbox.contacts("demo-location")] == ["demo@example.com"]

    def test_reconfiguring_a_location_keeps_its_contacts(self, api, sandbox):
        api.upsert({"email": "keep@example.com"})
        sandbox.put_location(api.location, allowDuplicateContact=True)
        assert len(sandbox.contacts(api.location)) == 1

    def test_token_for_an_unknown_location_is_refused(self, sandbox):
        with pytest.raises(requests.HTTPError, match="404"):
            sandbox.add_token(token="t", locationId="nowhere")

    @pytest.mark.parametrize(
        "faults",
        [{"error_rate": 2}, {"phase": "during"}, {"bogus": 1}],
        ids=["rate>1", "phase", "unknown-knob"],
    )
    def test_invalid_fault_config_is_refused(self, sandbox, faults):
        with pytest.raises(requests.HTTPError, match="422"):
            sandbox.set_faults(**faults)

    def test_stats_count_requests_by_endpoint_status_and_location(self, api, sandbox):
        created = api.upsert({"email": "s@example.com"}).json()["contact"]
        api.upsert({"email": "s@example.com"})
        api.upsert({"email": "bad"})
        api.contact(created["id"])
        stats = sandbox.stats()
        assert stats["requests"]["POST /contacts/upsert"] == {"200": 2, "422": 1}
        assert stats["requests"]["GET /contacts/{contactId}"] == {"200": 1}
        assert stats["locations"][api.location] == {"contacts": 1, "requests": 4, "created": 1, "updated": 1}


@pytest.fixture(scope="module")
def schema(sandbox_server):
    return requests.get(f"{sandbox_server.base_url}/openapi.json", timeout=10).json()


class TestOpenApi:
    def test_documents_the_public_endpoints_only(self, schema):
        assert set(schema["paths"]) == {
            "/contacts/upsert",
            "/contacts/{contactId}",
            "/oauth/token",
            "/oauth/installedLocations",
            "/oauth/locationToken",
        }

    def test_upsert_request_model_has_every_field_and_forbids_others(self, schema):
        request = schema["components"]["schemas"]["UpsertContactRequest"]
        assert request["additionalProperties"] is False
        assert request["required"] == ["locationId"]
        assert set(request["properties"]) == {
            "locationId", "firstName", "lastName", "name", "email", "gender", "phone", "address1", "city",
            "state", "postalCode", "website", "timezone", "dnd", "dndSettings", "inboundDndSettings", "tags",
            "customFields", "source", "dateOfBirth", "country", "companyName", "assignedTo",
            "createNewIfDuplicateAllowed",
        }  # fmt: skip

    def test_upsert_documents_its_statuses_version_header_and_bearer_auth(self, schema):
        operation = schema["paths"]["/contacts/upsert"]["post"]
        assert set(operation["responses"]) == {"200", "400", "401", "403", "422", "429"}
        assert operation["parameters"][0]["name"] == "Version"
        assert operation["parameters"][0]["schema"]["enum"] == ["2023-02-21"]
        assert operation["security"] == [{"bearerAuth": []}]
        assert "X-RateLimit-Remaining" in operation["responses"]["429"]["headers"]

    def test_get_contact_documents_404(self, schema):
        assert "404" in schema["paths"]["/contacts/{contactId}"]["get"]["responses"]


@pytest.mark.slow
class TestCommandLine:
    def test_config_file_sets_locations_tokens_and_faults_and_reset_restores_it(self, tmp_path):
        config = {
            "locations": {"loc-cfg": {"duplicateCheckFields": ["phone"], "rateLimit": {"burst": 7}}},
            "tokens": [{"token": "tok-cfg", "locationId": "loc-cfg"}],
            "faults": {"error_rate": 1.0, "error_statuses": [503]},
        }
        path = tmp_path / "sandbox.yaml"
        path.write_text(yaml.safe_dump(config))
        with SandboxProcess(args=["--config", str(path)]) as server:
            url = f"{server.base_url}/contacts/upsert"
            first = requests.post(url, json={"locationId": "loc-cfg"}, headers=HEADERS, timeout=10)
            SandboxAdmin(server.base_url).reset()
            second = requests.post(url, json={"locationId": "loc-cfg"}, headers=HEADERS, timeout=10)
        assert (first.status_code, second.status_code) == (503, 503)
        assert first.headers["X-RateLimit-Max"] == "7"

    def test_state_file_keeps_contacts_tokens_and_spent_refresh_tokens_across_restarts(self, tmp_path):
        config = {
            "locations": {"loc-cfg": {}},
            "tokens": [{"token": "tok-cfg", "locationId": "loc-cfg", "refreshToken": "rt", "clientId": "c",
                        "clientSecret": "s"}],
        }  # fmt: skip
        (tmp_path / "c.json").write_text(json.dumps(config))
        args = ["--config", str(tmp_path / "c.json"), "--state", str(tmp_path / "state.db")]
        form = {"grant_type": "refresh_token", "client_id": "c", "client_secret": "s", "refresh_token": "rt"}
        with SandboxProcess(args=args) as server:
            body = {"locationId": "loc-cfg", "email": "kept@example.com"}
            requests.post(f"{server.base_url}/contacts/upsert", json=body, headers=HEADERS, timeout=10)
            new_token = requests.post(f"{server.base_url}/oauth/token", data=form, timeout=10).json()
        with SandboxProcess(args=args) as server:
            contacts = SandboxAdmin(server.base_url).contacts("loc-cfg")
            reuse = requests.post(f"{server.base_url}/oauth/token", data=form, timeout=10)
            headers = {**HEADERS, "Authorization": f"Bearer {new_token['access_token']}"}
            again = requests.post(
                f"{server.base_url}/contacts/upsert",
                json=body | {"city": "Bonn"},
                headers=headers,
                timeout=10,
            )
        assert [c["email"] for c in contacts] == ["kept@example.com"]
        assert reuse.status_code == 400
        assert again.json()["new"] is False

    def test_api_versions_option_sets_the_accepted_versions(self):
        headers = {"Authorization": "Bearer sandbox-demo-token", "Version": "2021-07-28"}
        with SandboxProcess(args=["--api-versions", "2021-07-28,2023-02-21"]) as server:
            url = f"{server.base_url}/contacts/upsert"
            ok = requests.post(url, json={"locationId": "demo-location"}, headers=headers, timeout=10)
            bad = requests.post(url, json={}, headers={**headers, "Version": "2020-01-01"}, timeout=10)
        assert ok.status_code == 200
        assert bad.json()["message"] == "Version header must be one of: 2021-07-28, 2023-02-21"

    def test_bad_config_file_fails_startup_with_the_servers_message(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("locations: {loc: {allowDuplicateContact: maybe}}\n")
        with pytest.raises(RuntimeError, match="bad --config"), SandboxProcess(args=["--config", str(path)]):
            pass
