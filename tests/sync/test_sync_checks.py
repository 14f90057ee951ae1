"""The GX suite: each check flags its rows with a reason; results are kept and rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_sync_mapping import ROW

from growthhub_sync.checks import QualityChecker
from growthhub_sync.config import SyncConfig, load_config, parse_config
from growthhub_sync.mapping import Mapper


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> SyncConfig:
    data = load_config().model_dump(by_alias=True, exclude_none=True)
    base = tmp_path_factory.mktemp("gx")
    data["quality"].update(results_dir=str(base / "results"), data_docs_dir=str(base / "docs"))
    data["mapping"].update(dnd_settings={"Email": "source"})
    return parse_config(data)


def _mapped_columns(config: SyncConfig) -> list[str]:
    cols = config.source_columns()
    return list(Mapper(config, cols).map([tuple(ROW.get(c) for c in cols)], "loc1").frame.columns)


@pytest.fixture(scope="module")
def checker(config: SyncConfig) -> QualityChecker:
    return QualityChecker(config, _mapped_columns(config))


def _failures(
    config: SyncConfig, checker: QualityChecker, run_name: str = "test_checks", **changes: Any
) -> dict[str, str]:
    cols = config.source_columns()
    good = {**ROW, "source": "active"}
    rows = [tuple(good.get(c) for c in cols), tuple({**good, **changes}.get(c) for c in cols)]
    batch = Mapper(config, cols).map(rows, "loc1")
    result = checker.validate(batch.frame, batch.reasons, run_name)
    assert 0 not in result.failures, "the good row must pass"
    return result.failures.get(1, {})


@pytest.mark.parametrize(
    ("changes", "check", "reason"),
    [
        ({"email": "ann@"}, "email", "email: There must be something after the @-sign."),
        ({"phone": "12345"}, "phone", "phone: not a valid number (default region US)"),
        ({"date_of_birth": "31/12/1990"}, "dateOfBirth", "dateOfBirth: not a calendar date"),
        ({"date_of_birth": "2999-01-01"}, "dateOfBirth", "dateOfBirth: in the future"),
        ({"country": "XX"}, "country", "country: 'XX' is not an ISO 3166-1 alpha-2 code"),
        ({"country": "USA"}, "country", "country: 'USA' is not an ISO 3166-1 alpha-2 code"),
        ({"timezone": "Mars/Olympus"}, "timezone", "timezone: 'Mars/Olympus' is not an IANA time zone"),
        ({"website": "ftp://example.com"}, "website", "website: not an http(s) URL with a host name"),
        ({"gender": "robot"}, "gender", "gender: 'robot' is not one of male, female, other"),
        ({"source": "maybe"}, "dnd", "dndSettings.Email: 'maybe' is not one of active, inactive, permanent"),
        ({"email": None, "phone": None}, "identity", "identity: neither an email nor a phone given"),
        ({"email": "ann@", "phone": None}, "identity", "identity: email invalid and no phone given"),
        ({"email": None, "phone": "12345"}, "identity", "identity: phone invalid and no email given"),
        ({"email": "ann@", "phone": "12345"}, "identity", "identity: email and phone both invalid"),
    ],
)
def test_check_flags_the_row_with_its_reason(
    config: SyncConfig, checker: QualityChecker, changes: dict[str, Any], check: str, reason: str
) -> None:
    failures = _failures(config, checker, **changes)
    assert failures.get(check) == reason


def test_valid_row_passes_every_check(config: SyncConfig, checker: QualityChecker) -> None:
    assert _failures(config, checker) == {}


def test_results_are_kept_as_json_and_rendered_as_data_docs(
    config: SyncConfig, checker: QualityChecker
) -> None:
    _failures(config, checker, email="ann@")
    url = checker.build_data_docs()
    docs = Path(config.quality.data_docs_dir)
    assert url.endswith("index.html")
    assert (docs / "index.html").exists()
    assert list(Path(config.quality.results_dir).rglob("*.json"))
    assert list((docs / "validations").rglob("*.html"))


def _with_folders(config: SyncConfig, results_dir: str, data_docs_dir: str) -> SyncConfig:
    data = config.model_dump(by_alias=True, exclude_none=True)
    data["quality"].update(results_dir=results_dir, data_docs_dir=data_docs_dir)
    return parse_config(data)


def test_data_docs_render_the_results_every_worker_wrote_to_a_shared_folder(
    config: SyncConfig, tmp_path: Path
) -> None:
    # Celery: batches validate in separate processes (a GX context each); finalize renders them all
    shared = _with_folders(config, str(tmp_path / "results"), str(tmp_path / "docs"))
    for batch in ("batch0", "batch1"):
        _failures(shared, QualityChecker(shared, _mapped_columns(shared)), f"run1__{batch}", email="ann@")
    QualityChecker(shared, _mapped_columns(shared)).build_data_docs("run1__")
    # validations/<suite>/<run name>/<run time>/<asset>.html
    runs = {page.parts[-3] for page in (tmp_path / "docs" / "validations").rglob("*.html")}
    assert runs == {"run1__batch0", "run1__batch1"}


def test_relative_folders_are_under_the_working_directory(
    config: SyncConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = _with_folders(config, "gx/results", "gx/docs")
    worker = QualityChecker(relative, _mapped_columns(relative))
    _failures(relative, worker, email="ann@")
    assert worker.build_data_docs() == (tmp_path / "gx" / "docs" / "index.html").as_uri()
    assert list((tmp_path / "gx" / "results").rglob("*.json"))
