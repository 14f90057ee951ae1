"""Duplicate matching as the reference describes it, including concurrent upserts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration


def configure(sandbox, api, *, allow: bool = False, fields: tuple[str, ...] = ("email", "phone")) -> None:
    sandbox.put_location(api.location, allowDuplicateContact=allow, duplicateCheckFields=list(fields))


class TestMatching:
    @pytest.mark.parametrize(
        ("first", "second"),
        [
            ({"email": "Ann@Example.com"}, {"email": "ann@example.COM"}),
            ({"phone": "+1 202-555-0143"}, {"phone": "(202) 555-0143"}),
            ({"phone": "+1 202-555-0143"}, {"phone": "+12025550143"}),
        ],
        ids=["email-case-insensitive", "phone-national-format", "phone-e164"],
    )
    def test_same_identity_updates_the_existing_contact(self, api, sandbox, first, second):
        created = api.upsert({**first, "firstName": "A"}).json()
        updated = api.upsert({**second, "lastName": "B"}).json()
        assert (created["new"], updated["new"]) == (True, False)
        assert updated["contact"]["id"] == created["contact"]["id"]
        assert len(sandbox.contacts(api.location)) == 1

    def test_contact_without_email_or_phone_is_always_new(self, api, sandbox):
        api.upsert({"firstName": "X"})
        api.upsert({"firstName": "X"})
        assert len(sandbox.contacts(api.location)) == 2

    @pytest.mark.parametrize(
        ("order", "updated", "untouched", "ignored_field"),
        [
            (("email", "phone"), "by_email", "by_phone", "phone"),
            (("phone", "email"), "by_phone", "by_email", "email"),
        ],
        ids=["email-first", "phone-first"],
    )
    def test_email_and_phone_matching_two_contacts_updates_the_first_in_priority(
        self, api, sandbox, order, updated, untouched, ignored_field
    ):
        configure(sandbox, api, fields=order)
        existing = {
            "by_email": api.upsert({"email": "e@example.com", "phone": "+1 202-555-0100"}).json()["contact"],
            "by_phone": api.upsert({"email": "p@example.com", "phone": "+1 202-555-0199"}).json()["contact"],
        }

        result = api.upsert({"email": "e@example.com", "phone": "+1 202-555-0199", "city": "Oslo"}).json()

        assert result["new"] is False
        contact = result["contact"]
        assert contact["id"] == existing[updated]["id"]
        assert contact["city"] == "Oslo"
        # the second field would duplicate the other contact's value, so it is ignored
        assert contact[ignored_field] == existing[updated][ignored_field]
        others = {c["id"]: c for c in sandbox.contacts(api.location)}
        assert others[existing[untouched]["id"]]["city"] is None
        assert len(others) == 2

    def test_second_field_is_applied_when_it_matches_no_other_contact(self, api):
        created = api.upsert({"email": "e@example.com"}).json()["contact"]
        updated = api.upsert({"email": "e@example.com", "phone": "+1 202-555-0100"}).json()["contact"]
        assert (updated["id"], updated["phone"]) == (created["id"], "+12025550100")

    def test_field_outside_the_check_fields_does_not_match(self, api, sandbox):
        configure(sandbox, api, fields=("email",))
        api.upsert({"email": "one@example.com", "phone": "+1 202-555-0100"})
        result = api.upsert({"email": "two@example.com", "phone": "+1 202-555-0100"}).json()
        assert result["new"] is True

    @pytest.mark.parametrize(
        ("allow", "create_new", "expect_new"),
        [
            (True, True, True),  # scenario 1: created without looking for duplicates
            (False, True, False),  # scenario 2: flag ignored, normal upsert
            (True, False, False),  # scenario 3: flag false, normal upsert despite the setting
            (False, False, False),  # scenario 3, setting off
        ],
        ids=["1-allowed-and-flag", "2-flag-but-not-allowed", "3-allowed-no-flag", "3-neither"],
    )
    def test_create_new_if_duplicate_allowed_scenarios(self, api, sandbox, allow, create_new, expect_new):
        configure(sandbox, api, allow=allow)
        first = api.upsert({"email": "dup@example.com"}).json()["contact"]
        result = api.upsert({"email": "dup@example.com", "createNewIfDuplicateAllowed": create_new}).json()
        assert result["new"] is expect_new
        assert (result["contact"]["id"] == first["id"]) is not expect_new
        assert len(sandbox.contacts(api.location)) == (2 if expect_new else 1)

    def test_with_duplicates_allowed_the_oldest_match_is_updated(self, api, sandbox):
        configure(sandbox, api, allow=True)
        oldest = api.upsert({"email": "dup@example.com"}).json()["contact"]
        api.upsert({"email": "dup@example.com", "createNewIfDuplicateAllowed": True})
        result = api.upsert({"email": "dup@example.com", "city": "Rome"}).json()
        assert result["contact"]["id"] == oldest["id"]


class TestConcurrency:
    def send_same_identity(self, api, n: int = 8) -> list[dict]:
        with ThreadPoolExecutor(max_workers=n) as pool:
            responses = list(
                pool.map(lambda i: api.upsert({"email": "race@example.com", "city": str(i)}), range(n))
            )
        assert all(r.status_code == 200 for r in responses)
        return [r.json() for r in responses]

    def test_concurrent_same_identity_upserts_create_one_contact(self, api, sandbox):
        results = self.send_same_identity(api)
        assert sum(r["new"] for r in results) == 1
        assert len(sandbox.contacts(api.location)) == 1

    def test_race_window_lets_concurrent_upserts_create_duplicates(self, api, sandbox):
        sandbox.set_faults(race_window_ms=300)
        results = self.send_same_identity(api, n=4)
        assert sum(r["new"] for r in results) == 4
        assert len(sandbox.contacts(api.location)) == 4
