"""DELETE /contacts/{id}, the ``ignore_fields`` fault ("200 yet unchanged") and the admin's new day."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.integration

DELETE = "DELETE /contacts/{contactId}"
ALICE = {"email": "alice@example.com", "phone": "+1 888-888-8888", "gender": "female", "firstName": "Alice"}


def limit(sandbox, api, *, burst: int = 1000, daily: int = 1000) -> None:
    sandbox.put_location(api.location, rateLimit={"burst": burst, "intervalMs": 60_000, "daily": daily})


def daily_remaining(response: requests.Response) -> int:
    return int(response.headers["X-RateLimit-Daily-Remaining"])


def create(api, body: dict | None = None, **kwargs) -> str:
    response = api.upsert(body or ALICE, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["contact"]["id"]


class TestDelete:
    def test_deletes_once_then_answers_404_like_get(self, api, sandbox):
        contact_id = create(api)
        first = api.delete(contact_id)
        again = api.delete(contact_id)
        assert (first.status_code, first.json()) == (200, {"succeded": True})
        assert again.status_code == 404
        get = api.contact(contact_id)
        assert get.status_code == 404
        assert (
            again.json()
            == get.json()
            == {"statusCode": 404, "message": "Contact not found", "error": "Not Found"}
        )
        assert sandbox.contacts(api.location) == []

    def test_unknown_id_is_404(self, api):
        assert api.delete("no-such-contact").status_code == 404

    def test_another_locations_contact_is_404_and_kept(self, api, sandbox):
        theirs = create(api, {"locationId": api.other_location, **ALICE}, token="tok-other")
        assert api.delete(theirs).status_code == 404
        assert api.contact(theirs, token="tok-other").status_code == 200
        assert [c["id"] for c in sandbox.contacts(api.other_location)] == [theirs]

    def test_auth_like_the_other_contact_endpoints(self, api, sandbox):
        contact_id = create(api)
        sandbox.add_token(token="tok-read", locationId=api.location, scopes=["contacts.readonly"])
        assert api.delete(contact_id, token=None).status_code == 401
        assert api.delete(contact_id, token="bogus").json()["statusCode"] == 401
        forbidden = api.delete(contact_id, token="tok-read")
        assert forbidden.status_code == 403
        assert "X-RateLimit-Remaining" in forbidden.headers
        missing_version = api.session.delete(
            f"{api.base_url}/contacts/{contact_id}", headers=api.headers(version=None), timeout=10
        )
        assert missing_version.status_code == 400
        assert api.contact(contact_id).status_code == 200

    def test_counts_against_the_locations_limits(self, api, sandbox):
        limit(sandbox, api, burst=2, daily=10)
        contact_id = create(api)
        deleted = api.delete(contact_id)
        assert daily_remaining(deleted) == 8
        assert api.delete(contact_id).status_code == 429  # the burst of 2 is spent

    def test_frees_the_email_and_phone_for_later_upserts(self, api, sandbox):
        old_id = create(api)
        api.delete(old_id)
        by_email = api.upsert({"email": ALICE["email"]}).json()
        by_phone = api.upsert({"phone": ALICE["phone"]}).json()
        assert by_email["new"] is True
        assert by_email["contact"]["id"] != old_id
        assert by_phone["new"] is True
        assert len(sandbox.contacts(api.location)) == 2

    def test_recorded_in_stats_and_timeline(self, api, sandbox):
        contact_id = create(api)
        api.delete(contact_id)
        api.delete(contact_id)
        stats = sandbox.stats()
        assert stats["requests"][DELETE] == {"200": 1, "404": 1}
        assert stats["locations"][api.location]["contacts"] == 0
        buckets = sandbox.timeline(api.location, bucket_ms=60_000, endpoint=DELETE)
        assert sum(b["answers"].get("200", 0) + b["answers"].get("404", 0) for b in buckets) == 2

    @pytest.mark.parametrize(("phase", "kept"), [("before", True), ("after", False)])
    def test_injected_faults_apply_with_their_phase(self, api, sandbox, phase, kept):
        contact_id = create(api)
        sandbox.set_faults(error_rate=1.0, error_statuses=[503], phase=phase)
        assert api.delete(contact_id).status_code == 503
        sandbox.set_faults()
        assert (api.contact(contact_id).status_code == 200) is kept

    def test_is_in_the_openapi_document(self, api):
        schema = requests.get(f"{api.base_url}/openapi.json", timeout=10).json()
        operation = schema["paths"]["/contacts/{contactId}"]["delete"]
        assert set(operation["responses"]) == {"200", "400", "401", "403", "404", "429"}
        assert operation["security"] == [{"bearerAuth": []}]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert schema["components"]["schemas"][ok.rsplit("/", 1)[1]]["required"] == ["succeded"]


class TestIgnoredFields:
    def test_update_answers_200_but_keeps_the_ignored_fields(self, api, sandbox):
        contact_id = create(api)
        sandbox.set_faults(ignore_fields={"update": ["gender", "phone"], "create": []})
        response = api.upsert(
            {"email": ALICE["email"], "gender": "male", "phone": "+1 415-555-0100", "firstName": "Al"}
        )
        assert response.status_code == 200
        assert response.json()["new"] is False
        stored = api.contact(contact_id).json()["contact"]
        assert (stored["gender"], stored["phone"], stored["firstName"]) == ("female", "+18888888888", "Al")
        assert sandbox.stats()["faults"] == {"ignore_fields": 1}

    def test_create_leaves_the_ignored_fields_unset_and_updates_still_write_them(self, api, sandbox):
        sandbox.set_faults(ignore_fields={"create": ["gender"]})
        contact_id = create(api)
        assert api.contact(contact_id).json()["contact"]["gender"] is None
        api.upsert({"email": ALICE["email"], "gender": "female"})
        assert api.contact(contact_id).json()["contact"]["gender"] == "female"

    def test_nothing_is_ignored_by_default(self, api, sandbox):
        assert sandbox.set_faults()["ignore_fields"] == {"create": [], "update": []}
        contact_id = create(api)
        api.upsert({"email": ALICE["email"], "gender": "male"})
        assert api.contact(contact_id).json()["contact"]["gender"] == "male"
        assert sandbox.stats()["faults"] == {}

    def test_a_misspelt_field_is_refused(self, sandbox):
        with pytest.raises(requests.HTTPError) as refused:
            sandbox.set_faults(ignore_fields={"update": ["gendr"]})
        assert refused.value.response.status_code == 422


class TestNewDay:
    def test_resets_the_daily_remaining_of_every_location(self, api, sandbox):
        limit(sandbox, api, daily=3)
        sandbox.put_location(api.other_location, rateLimit={"burst": 1000, "intervalMs": 60_000, "daily": 3})
        other = {"locationId": api.other_location}
        api.upsert({"email": "a@example.com"})
        assert daily_remaining(api.upsert({"email": "b@example.com"})) == 1
        assert daily_remaining(api.upsert(other, token="tok-other")) == 2
        day = sandbox.new_day()
        assert day["dayOffset"] == 1
        after = api.upsert({"email": "c@example.com"})
        assert (int(after.headers["X-RateLimit-Limit-Daily"]), daily_remaining(after)) == (3, 2)
        assert daily_remaining(api.upsert(other, token="tok-other")) == 2

    def test_an_exhausted_quota_is_full_again_the_next_day(self, api, sandbox):
        limit(sandbox, api, daily=1)
        assert api.upsert({"email": "a@example.com"}).status_code == 200
        assert api.upsert({"email": "b@example.com"}).status_code == 429
        first, second = sandbox.new_day(), sandbox.new_day()
        assert first["day"] < second["day"]
        assert api.upsert({"email": "b@example.com"}).status_code == 200
        assert api.upsert({"email": "c@example.com"}).status_code == 429
