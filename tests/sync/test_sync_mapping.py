"""Map + normalise: payload shape, normalisers, null policy, tags, custom fields, dnd."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from growthhub_sync.config import SyncConfig, load_config, parse_config
from growthhub_sync.mapping import Mapper
from growthhub_sync.normalise import (
    normalise_date_of_birth,
    normalise_email,
    normalise_phone,
    normalise_website,
)

TODAY = date(2026, 6, 1)
ROW = {
    "id": "k1",
    "updated_at": datetime(2026, 1, 1, tzinfo=UTC),
    "first_name": " Ann ",
    "last_name": "Lee",
    "email": "Ann@Example.COM",
    "phone": "(202) 555-0143",
    "date_of_birth": "1990-09-25",
    "gender": "F",
    "address1": "3535 1st St N",
    "city": "Dolomite",
    "state": "AL",
    "postal_code": "35061",
    "country": "us",
    "website": "www.example.com",
    "timezone": "america/chihuahua",
    "company_name": "Acme",
    "tags": "vip, lead",
    "source": "warehouse",
    "dnd": False,
    "lifetime_value": Decimal("12.50"),
}


def _map(cfg: SyncConfig, **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    cols = cfg.source_columns()
    row = {**ROW, **changes}
    batch = Mapper(cfg, cols).map([tuple(row.get(c) for c in cols)], "loc1")
    return batch.payloads[0], batch.frame.iloc[0].to_dict()


def _cfg(**mapping: Any) -> SyncConfig:
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data["mapping"].update(mapping)
    return parse_config(data)


class TestNormalisers:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [("Ann@Example.COM", "Ann@example.com"), ("a.b+tag@sub.example.org", "a.b+tag@sub.example.org")],
    )
    def test_valid_email_is_normalised(self, raw: str, expected: str) -> None:
        assert normalise_email(raw) == (expected, None)

    @pytest.mark.parametrize("raw", ["ann@", "ann.example.com", "a@@example.com", "ann @example.com", "a@b"])
    def test_invalid_email_has_a_reason(self, raw: str) -> None:
        value, reason = normalise_email(raw)
        assert value is None
        assert reason
        assert reason.startswith("email:")

    @pytest.mark.parametrize(
        ("raw", "region", "expected"),
        [
            ("(202) 555-0143", "US", "+12025550143"),
            ("+1 202 555 0143", "US", "+12025550143"),
            ("202.555.0143", "US", "+12025550143"),
            ("020 7946 0958", "GB", "+442079460958"),
            ("+44 20 7946 0958", "US", "+442079460958"),
        ],
    )
    def test_phone_becomes_e164(self, raw: str, region: str, expected: str) -> None:
        assert normalise_phone(raw, region) == (expected, None)

    @pytest.mark.parametrize("raw", ["12345", "555-CALL-NOW", "+1 (000) 000-0000", "not a phone"])
    def test_invalid_phone_has_a_reason(self, raw: str) -> None:
        value, reason = normalise_phone(raw, "US")
        assert value is None
        assert reason
        assert reason.startswith("phone:")

    @pytest.mark.parametrize(
        "raw",
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
    def test_each_reference_date_format_is_accepted(self, raw: str) -> None:
        assert normalise_date_of_birth(raw, TODAY) == ("1990-09-25", None)

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            ("25/09/1990", "not a calendar date"),
            ("9/25/90", "accepted formats"),
            ("1990-09/25", "accepted formats"),
            ("25 Sep 1990", "accepted formats"),
            ("1990-02-30", "not a calendar date"),
            ("2027-01-01", "in the future"),
        ],
    )
    def test_bad_date_of_birth_is_rejected_not_guessed(self, raw: str, reason: str) -> None:
        value, why = normalise_date_of_birth(raw, TODAY)
        assert value is None
        assert why is not None
        assert reason in why

    def test_date_column_is_accepted(self) -> None:
        assert normalise_date_of_birth(date(1990, 9, 25), TODAY) == ("1990-09-25", None)

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("https://www.tesla.com", "https://www.tesla.com"),
            ("example.com/x", "https://example.com/x"),
            ("http://a.example.org", "http://a.example.org"),
        ],
    )
    def test_website_is_an_http_url(self, raw: str, expected: str) -> None:
        assert normalise_website(raw) == (expected, None)

    @pytest.mark.parametrize("raw", ["ftp://example.com", "http://localhost", "not a url", "http:// x.com"])
    def test_bad_website_has_a_reason(self, raw: str) -> None:
        assert normalise_website(raw)[0] is None


class TestMapper:
    def test_row_becomes_a_reference_payload(self) -> None:
        payload, _ = _map(load_config())
        assert payload == {
            "locationId": "loc1",
            "firstName": "Ann",
            "lastName": "Lee",
            "email": "Ann@example.com",
            "phone": "+12025550143",
            "dateOfBirth": "1990-09-25",
            "gender": "female",
            "address1": "3535 1st St N",
            "city": "Dolomite",
            "state": "AL",
            "postalCode": "35061",
            "country": "US",
            "website": "https://www.example.com",
            "timezone": "America/Chihuahua",
            "companyName": "Acme",
            "source": "warehouse",
            "dnd": False,
            "tags": ["vip", "lead"],
            "customFields": [{"key": "lifetime_value", "field_value": 12.5}],
        }

    @pytest.mark.parametrize("blank", [None, "", "   "])
    def test_null_is_not_sent_by_default(self, blank: str | None) -> None:
        payload, _ = _map(load_config(), city=blank, tags=blank, lifetime_value=None)
        assert "city" not in payload
        assert "tags" not in payload
        assert "customFields" not in payload

    def test_clear_policy_sends_null_and_empty_tags(self) -> None:
        payload, _ = _map(_cfg(null_policy="clear"), city=None, tags=None, lifetime_value=None)
        assert payload["city"] is None
        assert payload["tags"] == []
        assert payload["customFields"] == [{"key": "lifetime_value", "field_value": None}]

    def test_per_field_policy_overrides_the_mapping(self) -> None:
        fields = load_config().model_dump(by_alias=True)["mapping"]["fields"]
        fields = {k: v for k, v in fields.items() if v}
        fields["city"] = {"column": "city", "on_null": "clear"}
        payload, _ = _map(_cfg(fields=fields), city=None, state=None)
        assert payload["city"] is None
        assert "state" not in payload

    def test_invalid_value_never_clears_the_crm(self) -> None:
        payload, frame = _map(_cfg(null_policy="clear"), phone="12345")
        assert "phone" not in payload
        assert frame["phone_ok"] is False

    @pytest.mark.parametrize(
        ("tags", "fmt", "expected"),
        [
            ("vip, lead,,vip ", "delimited", ["vip", "lead"]),
            (["vip", " lead", None, ""], "array", ["vip", "lead"]),
            ("a|b", "delimited", ["a", "b"]),
        ],
    )
    def test_tags_from_array_or_delimited_text(self, tags: Any, fmt: str, expected: list[str]) -> None:
        payload, _ = _map(
            _cfg(tags={"column": "tags", "format": fmt, "delimiter": "|" if "|" in str(tags) else ","}),
            tags=tags,
        )
        assert payload["tags"] == expected

    def test_custom_field_by_id(self) -> None:
        payload, _ = _map(
            _cfg(custom_fields=[{"id": "6dvNaf7VhkQ9snc5vnjJ", "column": "lifetime_value"}]),
            lifetime_value=Decimal("100"),
        )
        assert payload["customFields"] == [{"id": "6dvNaf7VhkQ9snc5vnjJ", "field_value": 100}]

    def test_dnd_settings_from_columns(self) -> None:
        payload, frame = _map(
            _cfg(dnd_settings={"Email": "source", "SMS": "gender"}, inbound_dnd="state"),
            source="Active",
            gender="permanent",
            state="inactive",
        )
        assert payload["dndSettings"] == {"Email": {"status": "active"}, "SMS": {"status": "permanent"}}
        assert payload["inboundDndSettings"] == {"all": {"status": "inactive"}}
        assert frame["dnd_Email"] == "active"

    @pytest.mark.parametrize(("raw", "expected"), [(1, True), (0, False), ("yes", True), (None, None)])
    def test_dnd_from_boolean_like_values(self, raw: Any, expected: bool | None) -> None:
        payload, _ = _map(load_config(), dnd=raw)
        assert payload.get("dnd") is expected

    def test_identity_prefers_email_then_phone(self) -> None:
        _, with_email = _map(load_config())
        _, phone_only = _map(load_config(), email=None)
        _, neither = _map(load_config(), email="bad@", phone=None)
        assert (with_email["identity"], phone_only["identity"], neither["identity"]) == (
            "Ann@example.com",
            "+12025550143",
            None,
        )
