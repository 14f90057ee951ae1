"""Config loading: the shipped default, the env override, and errors that name the bad key."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine

from growthhub_sync.config import CONFIG_ENV, ConfigError, load_config, parse_config, validate_source_columns
from growthhub_sync.demo import create_demo_table

DEFAULT = yaml.safe_load(Path(load_config.__code__.co_filename).with_name("default_config.yaml").read_text())


def _with(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


_DELETE = object()


class TestLoadConfig:
    def test_shipped_default_maps_the_demo_table(self) -> None:
        cfg = load_config()
        assert cfg.source.table == "crm_contacts"
        assert cfg.mapping.null_policy == "omit"
        assert cfg.mapping.tags is not None
        assert cfg.mapping.tags.format == "delimited"
        assert [cf.key for cf in cfg.mapping.custom_fields] == ["lifetime_value"]

    def test_env_variable_points_at_another_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "sync.yaml"
        path.write_text(yaml.safe_dump(_with("source.table", "people")))
        monkeypatch.setenv(CONFIG_ENV, str(path))
        assert load_config().source.table == "people"

    def test_missing_file_is_a_config_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(tmp_path / "nope.yaml")

    def test_invalid_yaml_is_a_config_error(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text("source: [unclosed")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_config(path)

    @pytest.mark.parametrize(
        ("path", "value", "key"),
        [
            ("mapping.fields.emial", "email", "mapping.fields.emial"),
            ("source.table", "contacts; drop table x", "source.table"),
            ("source.schema", "a-b", "source.schema"),
            ("mapping.fields.city", "city name", "mapping.fields.city.column"),
            ("source.url", "not a url", "source.url"),
            ("source.url", "://nohost", "source.url"),
            ("schedule", "every hour", "schedule"),
            ("quality.errors", ["email", "spelling"], "quality.errors.1"),
            ("quality.default_region", "XX", "quality.default_region"),
            ("quality.reject_rate_threshold", 2, "quality.reject_rate_threshold"),
            ("quality.results_dir", "s3://bucket/gx/validations", "quality.results_dir"),
            ("quality.data_docs_dir", "gs://bucket/gx/data_docs", "quality.data_docs_dir"),
            ("mapping.tags.format", "json", "mapping.tags.format"),
            ("mapping.null_policy", "wipe", "mapping.null_policy"),
            ("mapping.custom_fields", [{"key": "a", "id": "b", "column": "c"}], "mapping.custom_fields.0"),
            ("mapping.dnd_settings", {"Pigeon": "dnd"}, "mapping.dnd_settings.Pigeon"),
            ("locations", [], "locations"),
            ("locations.0.name", "bad name/..", "locations.0.name"),
            ("locations.0.filter", {"region; --": "x"}, "locations.0.filter"),
            ("state.prefix", "x-", "state.prefix"),
            ("batch_size", 0, "batch_size"),
            ("chunk_size", 0, "chunk_size"),
            ("chunk_size", 100_001, "chunk_size"),
            ("surprise", 1, "surprise"),
        ],
    )
    def test_bad_value_fails_naming_the_key(self, path: str, value: Any, key: str) -> None:
        with pytest.raises(ConfigError) as err:
            parse_config(_with(path, value))
        assert f"{key}:" in str(err.value)

    def test_mapping_without_email_or_phone_fails(self) -> None:
        data = _with("mapping.fields.email", _DELETE)
        del data["mapping"]["fields"]["phone"]
        with pytest.raises(ConfigError, match=r"email or fields\.phone"):
            parse_config(data)

    def test_duplicate_location_names_fail(self) -> None:
        data = _with("locations", [DEFAULT["locations"][0], DEFAULT["locations"][0]])
        with pytest.raises(ConfigError, match="duplicate location names"):
            parse_config(data)

    def test_unknown_location_names_the_known_ones(self) -> None:
        with pytest.raises(ConfigError, match="known: \\['default'\\]"):
            load_config().location("emea")

    @pytest.mark.parametrize("url", ["s3://bucket/gx", "gs://bucket/gx", "abfs://container@account/gx"])
    def test_gx_folder_refuses_an_object_store_naming_the_shared_volume_way(self, url: str) -> None:
        # GX Core 1.x has no S3/GCS/Azure store backend; as a path, the URL would be a local folder
        with pytest.raises(ConfigError, match="absolute path of a volume every worker mounts"):
            parse_config(_with("quality.results_dir", url))

    @pytest.mark.parametrize("folder", ["var/gx/validations", "/mnt/shared/gx/validations"])
    def test_gx_folder_is_a_relative_or_absolute_path(self, folder: str) -> None:
        assert parse_config(_with("quality.results_dir", folder)).quality.results_dir == folder

    def test_field_accepts_column_with_null_policy(self) -> None:
        cfg = parse_config(_with("mapping.fields.city", {"column": "city", "on_null": "clear"}))
        assert cfg.mapping.fields.city is not None
        assert cfg.mapping.fields.city.on_null == "clear"


class TestChunks:
    @pytest.mark.parametrize(
        ("batch_size", "chunk_size", "rows"),
        [(300, None, 300), (5000, None, 5000), (20_000, None, 5000), (20_000, 700, 700), (300, 700, 700)],
    )
    def test_rows_per_chunk_is_chunk_size_else_batch_size_capped(
        self, batch_size: int, chunk_size: int | None, rows: int
    ) -> None:
        data = {**copy.deepcopy(DEFAULT), "batch_size": batch_size, "chunk_size": chunk_size}
        assert parse_config(data).rows_per_chunk == rows

    def test_chunk_size_is_unset_by_default(self) -> None:
        assert load_config().chunk_size is None


def test_config_imports_no_airflow_glue() -> None:
    # config is read at DAG parse time and by the CLI: it must not build notifiers or load Airflow
    code = (
        "import sys, growthhub_sync.config as c; c.load_config();"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] == 'airflow' or m == 'growthhub_sync.alerts'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class TestSourceColumns:
    @pytest.fixture
    def engine(self, tmp_path: Path):  # type: ignore[no-untyped-def]
        engine = create_engine(f"sqlite:///{tmp_path / 'w.db'}")
        create_demo_table(engine)
        return engine

    def test_demo_table_matches_the_default_mapping(self, engine) -> None:  # type: ignore[no-untyped-def]
        validate_source_columns(load_config(), engine)

    @pytest.mark.parametrize(
        ("path", "value", "key"),
        [
            ("mapping.fields.city", "town", "mapping.fields.city.column"),
            ("source.updated_at_column", "modified", "source.updated_at_column"),
            ("mapping.tags.column", "labels", "mapping.tags.column"),
            ("locations.0.filter", {"region": "emea"}, "locations.0.filter.region"),
            ("mapping.custom_fields", [{"key": "ltv", "column": "ltv"}], "mapping.custom_fields.0.column"),
            ("mapping.dnd_settings", {"SMS": "sms_dnd"}, "mapping.dnd_settings.SMS"),
            ("mapping.inbound_dnd", "inbound", "mapping.inbound_dnd"),
        ],
    )
    def test_unknown_column_fails_naming_the_key(self, engine, path: str, value: Any, key: str) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(ConfigError, match=f"{key}: column"):
            validate_source_columns(parse_config(_with(path, value)), engine)

    def test_missing_table_fails_naming_source_table(self, engine) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(ConfigError, match=r"source\.table: table 'people' not found"):
            validate_source_columns(parse_config(_with("source.table", "people")), engine)


class TestWarehouseConnection:
    @pytest.mark.parametrize(
        ("conn", "expected"),
        [
            (
                {
                    "conn_type": "postgres",
                    "host": "db.internal",
                    "login": "etl",
                    "password": "s3cret",
                    "port": 5432,
                    "schema": "dwh",
                },
                "postgresql://etl:s3cret@db.internal:5432/dwh",
            ),
            ({"conn_type": "sqlite", "host": "/var/warehouse.db"}, "sqlite:////var/warehouse.db"),
            (
                {"conn_type": "generic", "extra": {"sqlalchemy_url": "sqlite:///x.db"}},
                "sqlite:///x.db",
            ),
        ],
    )
    def test_url_comes_from_the_airflow_connection(
        self, monkeypatch: pytest.MonkeyPatch, conn: dict[str, Any], expected: str
    ) -> None:
        from growthhub_sync.warehouse import warehouse_url

        monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", json.dumps(conn))
        assert re.sub(r"^postgresql\+\w+", "postgresql", warehouse_url("warehouse_default")) == expected
