"""POST /contacts/upsert and GET /contacts/{id}: fields, normalisation, merge rules."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

FILE_VALUE = {
    "f31175d4-2b06-4fc6-b7bc-74cd814c68cb": {
        "meta": {"fieldname": "1HeGizb13P0odwgOgKSs", "originalname": "IMG.jpg", "mimetype": "image/jpeg"},
        "url": "https://services.leadconnectorhq.com/documents/download/w2M9qTZ0ZJz8rGt02jdJ",
        "documentId": "w2M9qTZ0ZJz8rGt02jdJ",
    }
}
DND = {"status": "active", "message": "string", "code": "string"}
# The reference page's request example, with custom fields of this test location.
REFERENCE_BODY = {
    "firstName": "rosan",
    "lastName": "Deo",
    "name": "rosan Deo",
    "email": "rosan@deos.com",
    "gender": "male",
    "phone": "+1 888-888-8888",
    "address1": "3535 1st St N",
    "city": "Dolomite",
    "state": "AL",
    "postalCode": "35061",
    "website": "https://www.tesla.com",
    "timezone": "America/chihuahua",
    "dnd": True,
    "dndSettings": {ch: DND for ch in ("Call", "Email", "SMS", "WhatsApp", "GMB", "FB")},
    "inboundDndSettings": {"all": {"status": "active", "message": "string"}},
    "tags": ["nisi sint commodo amet", "consequat"],
    "customFields": [
        {"id": "cf-text", "key": "favourite_color", "field_value": "My Text"},
        {"key": "plan", "field_value": "My Selected Option"},
        {"id": "cf-number", "field_value": 100},
        {"id": "cf-money", "field_value": 100.5},
        {"id": "cf-list", "field_value": ["test", "test2"]},
        {"id": "cf-file", "field_value": FILE_VALUE},
    ],
    "source": "public api",
    "dateOfBirth": "1990-09-25",
    "country": "US",
    "companyName": "DGS VolMAX",
    "assignedTo": "user-1",
    "createNewIfDuplicateAllowed": False,
}


class TestUpsertCreate:
    def test_every_reference_field_is_accepted_and_echoed_normalised(self, api):
        response = api.upsert(REFERENCE_BODY)

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["new"] is True
        assert isinstance(body["traceId"], str)
        contact = body["contact"]
        assert len(contact["id"]) == 20
        assert contact["locationId"] == api.location
        assert contact["phone"] == "+18888888888"
        assert contact["emailLowerCase"] == "rosan@deos.com"
        assert contact["timezone"] == "America/Chihuahua"
        assert contact["fullNameLowerCase"] == "rosan deo"
        assert contact["dndSettings"]["WhatsApp"] == DND
        assert contact["inboundDndSettings"] == {"all": {"status": "active", "message": "string"}}
        assert contact["customFields"] == [
            {"id": "cf-text", "value": "My Text"},
            {"id": "cf-option", "value": "My Selected Option"},
            {"id": "cf-number", "value": 100},
            {"id": "cf-money", "value": 100.5},
            {"id": "cf-list", "value": ["test", "test2"]},
            {"id": "cf-file", "value": FILE_VALUE},
        ]
        for key in ("gender", "address1", "city", "state", "postalCode", "website", "source", "companyName"):
            assert contact[key] == REFERENCE_BODY[key]
        assert contact["dateAdded"].endswith("Z")
        assert contact["dateUpdated"] == contact["dateAdded"]

    @pytest.mark.parametrize("email", ["Ann+tag@example.co.uk", "qa@example.test"])
    def test_plausible_emails_are_accepted_as_sent(self, api, email):
        contact = api.upsert({"email": email}).json()["contact"]
        assert (contact["email"], contact["emailLowerCase"]) == (email, email.lower())

    def test_tags_are_stored_lower_case_once(self, api):
        contact = api.upsert({"email": "t@example.com", "tags": ["VIP", "vip ", "Lead"]}).json()["contact"]
        assert contact["tags"] == ["vip", "lead"]

    def test_name_is_built_from_first_and_last_name(self, api):
        contact = api.upsert({"email": "n@example.com", "firstName": "Ada", "lastName": "Lovelace"}).json()
        assert contact["contact"]["name"] == "Ada Lovelace"

    def test_phone_without_plus_uses_the_country_of_the_body(self, api):
        contact = api.upsert({"phone": "020 7183 8750", "country": "gb"}).json()["contact"]
        assert (contact["phone"], contact["country"]) == ("+442071838750", "GB")

    @pytest.mark.parametrize(
        "value",
        [
            "1990/09/25",
            "09/25/1990",
            "1990-09-25",
            "09-25-1990",
            "1990.09.25",
            "09.25.1990",
            "1990_09_25",
            "09_25_1990",
        ],
    )
    def test_each_documented_date_of_birth_format_is_stored_as_iso(self, api, value):
        response = api.upsert({"email": "dob@example.com", "dateOfBirth": value})
        assert response.status_code == 200, response.text
        assert response.json()["contact"]["dateOfBirth"] == "1990-09-25"

    @pytest.mark.parametrize(
        "value",
        ["2023-02-30", "02/30/2023", "2023-13-01", "1990-9-25", "25.09.1990", "1990-09-25T00:00:00Z", "x"],
    )
    def test_impossible_or_undocumented_dates_are_rejected(self, api, value):
        response = api.upsert({"email": "dob@example.com", "dateOfBirth": value})
        assert response.status_code == 422
        assert response.json()["message"] == [
            "dateOfBirth must be a valid date in one of the formats YYYY/MM/DD, MM/DD/YYYY, YYYY-MM-DD, "
            "MM-DD-YYYY, YYYY.MM.DD, MM.DD.YYYY, YYYY_MM_DD, MM_DD_YYYY"
        ]


class TestUpsertMerge:
    @pytest.fixture
    def existing(self, api):
        body = {
            "email": "merge@example.com",
            "firstName": "Old",
            "city": "Paris",
            "tags": ["a", "b"],
            "customFields": [{"id": "cf-text", "field_value": "red"}, {"id": "cf-number", "field_value": 1}],
            "dndSettings": {"SMS": {"status": "active"}},
        }
        return api.upsert(body).json()["contact"]

    def test_fields_not_sent_are_left_alone(self, api, existing):
        updated = api.upsert({"email": "merge@example.com", "lastName": "New"}).json()
        assert updated["new"] is False
        contact = updated["contact"]
        assert contact["id"] == existing["id"]
        assert (contact["firstName"], contact["lastName"], contact["city"]) == ("Old", "New", "Paris")
        assert contact["name"] == "Old New"
        assert contact["dateAdded"] == existing["dateAdded"]

    def test_tags_overwrite_all_tags(self, api, existing):
        contact = api.upsert({"email": "merge@example.com", "tags": ["c"]}).json()["contact"]
        assert contact["tags"] == ["c"]

    def test_custom_fields_merge_per_field_and_null_removes_one(self, api, existing):
        body = {
            "email": "merge@example.com",
            "customFields": [{"key": "score", "field_value": 2}, {"id": "cf-text", "field_value": None}],
        }
        contact = api.upsert(body).json()["contact"]
        assert contact["customFields"] == [{"id": "cf-number", "value": 2}]

    def test_dnd_settings_merge_per_channel(self, api, existing):
        body = {"email": "merge@example.com", "dndSettings": {"Email": {"status": "inactive"}}}
        contact = api.upsert(body).json()["contact"]
        assert contact["dndSettings"] == {"SMS": {"status": "active"}, "Email": {"status": "inactive"}}

    @pytest.mark.parametrize("empty", [None, ""])
    def test_null_or_empty_string_clears_a_field(self, api, existing, empty):
        contact = api.upsert({"email": "merge@example.com", "city": empty}).json()["contact"]
        assert contact["city"] is None


class TestGetContact:
    def test_returns_the_stored_contact(self, api):
        created = api.upsert({"email": "get@example.com", "firstName": "G"}).json()["contact"]
        response = api.contact(created["id"])
        assert response.status_code == 200
        assert response.json() == {"contact": created}

    def test_unknown_id_is_404(self, api):
        response = api.contact("nope")
        assert response.status_code == 404
        assert response.json() == {"statusCode": 404, "message": "Contact not found", "error": "Not Found"}

    def test_another_locations_contact_is_404(self, api):
        other = api.upsert({"locationId": api.other_location, "email": "o@example.com"}, token="tok-other")
        assert other.status_code == 200
        assert api.contact(other.json()["contact"]["id"]).status_code == 404

    def test_readonly_token_may_read(self, api, sandbox):
        created = api.upsert({"email": "ro@example.com"}).json()["contact"]
        sandbox.add_token(token="tok-ro", locationId=api.location, scopes=["contacts.readonly"])
        assert api.contact(created["id"], token="tok-ro").status_code == 200
