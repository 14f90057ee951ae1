"""Error statuses and bodies of the public API, and the order in which checks answer."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

UNAUTHORIZED = {
    "statusCode": 401,
    "message": "Invalid token: access token is invalid",
    "error": "Unauthorized",
}


class TestVersionHeader:
    @pytest.mark.parametrize("version", [None, "2021-07-28", ""], ids=["missing", "unsupported", "empty"])
    def test_missing_or_unsupported_version_is_400_naming_accepted_versions(self, api, version):
        response = api.upsert({"email": "v@example.com"}, version=version)
        assert response.status_code == 400
        assert response.json() == {
            "statusCode": 400,
            "message": "Version header must be one of: 2023-02-21",
            "error": "Bad Request",
        }

    def test_version_is_checked_before_the_token(self, api):
        assert api.upsert({"email": "v@example.com"}, version=None, token="bogus").status_code == 400


class TestUnauthorized:
    @pytest.mark.parametrize("token", [None, "bogus", ""], ids=["missing", "unknown", "empty"])
    def test_missing_or_unknown_token_is_401_with_the_real_body(self, api, token):
        response = api.upsert({"email": "a@example.com"}, token=token)
        assert response.status_code == 401
        assert response.json() == UNAUTHORIZED

    def test_non_bearer_scheme_is_401(self, api):
        headers = {"Authorization": f"Basic {api.token}", "Version": api.version}
        response = api.session.post(f"{api.base_url}/contacts/upsert", json={}, headers=headers, timeout=10)
        assert (response.status_code, response.json()) == (401, UNAUTHORIZED)

    def test_expired_token_is_401(self, api, sandbox):
        sandbox.add_token(token="tok-expired", locationId=api.location, expiresIn=0)
        response = api.upsert({"email": "a@example.com"}, token="tok-expired")
        assert (response.status_code, response.json()) == (401, UNAUTHORIZED)

    def test_token_is_checked_before_the_body(self, api):
        assert api.upsert(data="not json", token="bogus").status_code == 401


class TestForbidden:
    def test_token_without_write_scope_is_403(self, api, sandbox):
        sandbox.add_token(token="tok-ro", locationId=api.location, scopes=["contacts.readonly"])
        response = api.upsert({"email": "a@example.com"}, token="tok-ro")
        assert response.status_code == 403
        assert response.json()["error"] == "Forbidden"
        assert "X-RateLimit-Remaining" in response.headers

    def test_location_of_another_token_is_403(self, api):
        response = api.upsert({"locationId": api.other_location, "email": "a@example.com"})
        assert response.status_code == 403
        assert response.json() == {
            "statusCode": 403,
            "message": "The token does not have access to this location.",
            "error": "Forbidden",
        }

    def test_403_does_not_count_against_the_rate_limit(self, api, sandbox):
        sandbox.put_location(api.location, rateLimit={"burst": 1, "intervalMs": 60_000, "daily": 100})
        api.upsert({"locationId": api.other_location})
        assert api.upsert({"email": "a@example.com"}).status_code == 200


class TestBadRequest:
    @pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"', "", "null"])
    def test_body_that_is_not_a_json_object_is_400(self, api, raw):
        response = api.upsert(data=raw)
        assert response.status_code == 400
        assert response.json() == {
            "statusCode": 400,
            "message": "Request body must be a JSON object.",
            "error": "Bad Request",
        }

    def test_unknown_route_is_nest_style_404(self, api):
        response = api.session.get(f"{api.base_url}/contacts/", timeout=10)
        assert response.status_code == 404
        assert response.json() == {
            "statusCode": 404,
            "message": "Cannot GET /contacts/",
            "error": "Not Found",
        }


class TestValidation:
    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"locationId": None}, "locationId should not be empty"),
            ({"locationId": 5}, "locationId must be a string"),
            ({"foo": 1}, "property foo should not exist"),
            ({"email": "not-an-email"}, "email must be an email"),
            ({"phone": "12"}, "phone must be a valid phone number"),
            ({"phone": "+1 555 000 0000"}, "phone must be a valid phone number"),
            ({"country": "XX"}, "country must be a valid ISO31661 Alpha2 code"),
            ({"timezone": "Mars/Olympus"}, "timezone must be a valid IANA time zone"),
            ({"firstName": 3}, "firstName must be a string"),
            ({"dnd": "yes"}, "dnd must be a boolean value"),
            ({"createNewIfDuplicateAllowed": 1}, "createNewIfDuplicateAllowed must be a boolean value"),
            (
                {"dndSettings": {"SMS": {"status": "maybe"}}},
                "dndSettings.SMS.status must be one of the following values: active, inactive, permanent",
            ),
            ({"dndSettings": {"Fax": {"status": "active"}}}, "dndSettings.property Fax should not exist"),
            (
                {"inboundDndSettings": {"all": {"status": "permanent"}}},
                "inboundDndSettings.all.status must be one of the following values: active, inactive",
            ),
            ({"tags": "vip"}, "tags must be an array"),
            ({"tags": ["ok", 1]}, "each value in tags must be a string"),
            (
                {"customFields": [{"id": "cf-nope", "field_value": "x"}]},
                "customFields.0 must name a custom field of the location (unknown: cf-nope)",
            ),
            (
                {"customFields": [{"id": "cf-number", "field_value": "ten"}]},
                "customFields.0.field_value must be a number for a NUMERICAL field",
            ),
            (
                {"customFields": [{"key": "plan", "field_value": "Gold"}]},
                "customFields.0.field_value must be one of the options of field plan",
            ),
            ({"customFields": [{"id": "cf-text"}]}, "customFields.0.field_value should not be empty"),
            ({"assignedTo": "user-9"}, "assignedTo must be a user of the location (unknown: user-9)"),
        ],
    )
    def test_each_failing_field_has_its_message(self, api, fields, message):
        response = api.upsert({"email": "ok@example.com", **fields})
        assert response.status_code == 422
        assert response.json() == {"statusCode": 422, "message": [message], "error": "Unprocessable Entity"}

    def test_one_message_per_failing_field(self, api):
        body = {"email": "x", "phone": "1", "country": "ZZ", "bar": True}
        response = api.upsert(body)
        assert response.status_code == 422
        assert len(response.json()["message"]) == 4

    def test_missing_location_id_is_422(self, api):
        response = api.upsert(data='{"email": "a@example.com"}')
        assert response.status_code == 422
        assert response.json()["message"] == ["locationId should not be empty"]

    def test_rejected_upsert_writes_nothing(self, api, sandbox):
        api.upsert({"email": "bad", "firstName": "X"})
        assert sandbox.contacts(api.location) == []
