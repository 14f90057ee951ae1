"""The field registry: every field it declares reaches the config, the payload and the GX suite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from growthhub_sync.checks import QualityChecker
from growthhub_sync.config import SyncConfig, load_config, parse_config
from growthhub_sync.fields import (
    CHECKS,
    CODE_OF_CHECK,
    FIELDS,
    NORMALISED,
    PAYLOAD_KEYS_OF_CHECK,
    FieldSpec,
    reason_codes,
)
from growthhub_sync.mapping import Mapper
from growthhub_sync.reasons import (
    DUPLICATE_IDENTITY,
    LOCATION_MISSING,
    LOCATION_NOT_INSTALLED,
    LOCATION_UNKNOWN,
    REASONS,
    api_code,
)

VALID: dict[str, Any] = {
    "email": "ann@example.com",
    "phone": "(202) 555-0143",
    "gender": "F",
    "website": "example.com",
    "timezone": "UTC",
    "dnd": "yes",
    "dateOfBirth": "1990-09-25",
    "country": "us",
}
"""A valid raw value for each field that is more than text; any other field gets ``"x"``."""


def _column(spec: FieldSpec) -> str:
    return f"col_{spec.key.lower()}"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> SyncConfig:
    """The shipped config, mapping every registry field from a column of its own."""
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    base = tmp_path_factory.mktemp("gx")
    data["quality"].update(results_dir=str(base / "results"), data_docs_dir=str(base / "docs"))
    data["mapping"].update(fields={f.key: _column(f) for f in FIELDS}, custom_fields=[])
    del data["mapping"]["tags"]
    return parse_config(data)


@pytest.fixture(scope="module")
def checker(config: SyncConfig) -> QualityChecker:
    return QualityChecker(config, _payload(config)[1], keep_results=False)


def _payload(config: SyncConfig) -> tuple[dict[str, Any], list[str]]:
    cols = config.source_columns()
    row = {"id": 1, "updated_at": datetime(2026, 1, 1, tzinfo=UTC)}
    row |= {_column(f): VALID.get(f.key, "x") for f in FIELDS}
    batch = Mapper(config, cols).map([tuple(row[c] for c in cols)], "loc1")
    return batch.payloads[0], list(batch.frame.columns)


def test_every_field_that_is_not_plain_text_has_a_valid_sample() -> None:
    special = {f.key for f in FIELDS if f.read != "text" or f.normalise or f.canonical}
    assert special <= set(VALID)


@pytest.mark.parametrize("spec", FIELDS, ids=lambda f: f.key)
def test_config_accepts_the_field_by_its_payload_key(config: SyncConfig, spec: FieldSpec) -> None:
    mapped = getattr(config.mapping.fields, spec.key)
    assert mapped is not None
    assert mapped.column == _column(spec)
    assert ("mapping.fields." + spec.key + ".column", _column(spec)) in config.column_keys()


@pytest.mark.parametrize("spec", FIELDS, ids=lambda f: f.key)
def test_a_valid_value_reaches_the_payload_under_the_field_key(config: SyncConfig, spec: FieldSpec) -> None:
    payload, _ = _payload(config)
    assert payload.get(spec.key) is not None


def test_payload_keys_follow_the_registry_order(config: SyncConfig) -> None:
    payload, _ = _payload(config)
    assert list(payload) == ["locationId", *(f.key for f in FIELDS)]


@pytest.mark.parametrize("spec", [f for f in FIELDS if f.check], ids=lambda f: f.key)
def test_a_field_with_a_check_gets_its_expectation(checker: QualityChecker, spec: FieldSpec) -> None:
    assert spec.check in CHECKS
    assert (spec.check, spec.key) in {(c.check, c.value_column) for c in checker.checks}
    assert PAYLOAD_KEYS_OF_CHECK[spec.check] == (spec.key,)


def test_check_names_keep_their_released_order() -> None:
    # the default of quality.errors is part of the config fingerprint
    assert CHECKS == (
        "identity", "email", "phone", "dateOfBirth", "country", "timezone", "website", "gender", "dnd",
    )  # fmt: skip


def test_verdicts_keep_their_released_order() -> None:
    # a quarantined row lists its reasons in the suite's order
    assert [f.key for f in NORMALISED] == ["email", "phone", "dateOfBirth", "website", "country", "timezone"]


def test_an_unknown_field_is_refused_naming_it() -> None:
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    data["mapping"]["fields"]["middleName"] = "middle_name"
    with pytest.raises(ValueError, match=r"mapping\.fields\.middleName: Extra inputs are not permitted"):
        parse_config(data)


def test_every_check_has_a_registered_reason_code() -> None:
    assert set(CODE_OF_CHECK) == set(CHECKS)
    assert [f.key for f in FIELDS if f.check and not f.code] == []
    # and every registered code is one a row can get
    unroutable = {LOCATION_MISSING, LOCATION_NOT_INSTALLED, LOCATION_UNKNOWN}  # the fleet's rows
    api = {api_code(400), api_code(422)}
    assert set(REASONS) == {*CODE_OF_CHECK.values(), DUPLICATE_IDENTITY, *api, *unroutable}


@pytest.mark.parametrize(
    ("bad", "failed", "codes"),
    [
        (["identity"], ["identity"], ["no_identity"]),
        (["identity", "dateOfBirth"], ["identity", "dateOfBirth"], ["no_identity", "dob_invalid"]),
        # the only contact field given was invalid: that is the reason, not a missing identity
        (["identity", "email"], ["identity", "email"], ["email_invalid"]),
        (["identity", "phone"], ["identity", "phone"], ["phone_invalid"]),
        (["identity", "email", "phone"], ["identity", "email", "phone"], ["email_invalid", "phone_invalid"]),
        # ... even where the email check only warns
        (["identity"], ["identity", "email"], ["email_invalid"]),
        (
            ["email", "country", "dnd"],
            ["email", "country", "dnd", "website"],
            ["email_invalid", "country_invalid", "dnd_invalid"],
        ),
    ],
)
def test_reason_codes_of_a_quarantined_row(bad: list[str], failed: list[str], codes: list[str]) -> None:
    assert reason_codes(bad, failed) == codes
