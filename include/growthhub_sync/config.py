"""Sync configuration: one YAML file, validated with pydantic when it is loaded.

Everything a task would otherwise discover deep inside a run (an unsafe table name, a
misspelt GrowthHub field, a malformed URL) fails here with a message naming the key.
Column names are checked against the real table by :func:`validate_source_columns`,
which needs a database and therefore runs at plan time, not at import time.
"""

from __future__ import annotations

import hashlib
import os
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ImportString,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from growthhub_sync.fields import CHECKS, DND_CHANNELS, FIELDS

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

CONFIG_ENV = "GROWTHHUB_SYNC_CONFIG"
DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

UNROUTED = "_unrouted"
"""The location name of rows whose ``locations.from_column`` is NULL or blank (quarantined)."""


class ConfigError(ValueError):
    """The configuration is unusable; the message names the offending key."""

    failure_kind = "config"
    """How a run's failure alert presents it (:class:`~growthhub_sync.failures.RunFailure`)."""


class MissingConnectionError(ConfigError):
    """An Airflow connection the config names (at ``key``) is defined nowhere Airflow looks."""

    def __init__(self, key: str, conn_id: str, cause: str = "AirflowNotFoundException") -> None:
        self.key = key
        self.conn_id = conn_id
        super().__init__(
            f"{key}: Airflow connection {conn_id!r} is not defined ({cause}); define it, "
            f"e.g. as {self.env_var} in its JSON form"
        )

    @property
    def env_var(self) -> str:
        """The environment variable that defines the connection."""
        return f"AIRFLOW_CONN_{self.conn_id.upper()}"


def _identifier(value: str | None, what: str = "identifier") -> str | None:
    if value is not None and not _IDENT.match(value):
        raise ValueError(
            f"unsafe {what} {value!r}: use letters, digits and _ (max 63, not starting with a digit)"
        )
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceConfig(_Model):
    """Where the contacts live. ``url`` (a SQLAlchemy URL) wins over the Airflow connection."""

    conn_id: str = "warehouse_default"
    url: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    table: str = "crm_contacts"
    key_column: str = "id"
    updated_at_column: str = "updated_at"

    _check_idents = field_validator("schema_", "table", "key_column", "updated_at_column")(
        lambda v: _identifier(v)
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"malformed SQLAlchemy URL: {exc}") from None
        if not url.drivername:
            raise ValueError("malformed SQLAlchemy URL: no dialect")
        return value


class LocationConfig(_Model):
    """A GrowthHub sub-account; ``filter`` routes only matching rows (column = value; a null value:
    column NULL or blank) to it. ``mapping`` replaces the config's mapping for this location
    (custom-field ids differ per location)."""

    name: str
    location_id: str = Field(min_length=1)
    conn_id: str = "growthhub_default"
    filter: dict[str, str | int | bool | None] = Field(default_factory=dict)
    mapping: MappingConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data and data.get("location_id"):
            return {**data, "name": data["location_id"]}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"unsafe location name {value!r}: use letters, digits, _, . and -")
        return value

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: dict[str, Any]) -> dict[str, Any]:
        for column in value:
            _identifier(column, "column")
        return value


NullPolicy = Literal["omit", "clear"]


class FieldMap(_Model):
    """One source column; ``on_null`` overrides the mapping's null policy for this field."""

    column: str
    on_null: NullPolicy | None = None

    _col = field_validator("column")(lambda v: _identifier(v, "column"))


def _field(value: Any) -> Any:
    return {"column": value} if isinstance(value, str) else value


class _FieldsBase(_Model):
    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {k: _field(v) for k, v in data.items()} if isinstance(data, dict) else data

    def items(self) -> list[tuple[str, FieldMap]]:
        """The mapped fields, in registry order."""
        return [(name, fm) for name, fm in self if fm is not None]


Fields = create_model(  # one optional attribute per field of the registry: fields.email, ...
    "Fields",
    __base__=_FieldsBase,
    __doc__="GrowthHub Upsert Contact field ← source column (a name, or ``{column, on_null}``).",
    **{f.key: (FieldMap | None, None) for f in FIELDS},
)


class CustomFieldMap(_Model):
    """A custom field addressed by its ``key`` or its ``id`` (exactly one)."""

    key: str | None = None
    id: str | None = None
    column: str
    on_null: NullPolicy | None = None

    _col = field_validator("column")(lambda v: _identifier(v, "column"))

    @model_validator(mode="after")
    def _one_address(self) -> CustomFieldMap:
        if (self.key is None) == (self.id is None):
            raise ValueError("give exactly one of key or id")
        return self


class TagsMap(_Model):
    """Tags from an array column or a delimited text column.

    The API *overwrites* all of a contact's tags with the list sent, so mapping tags makes
    the warehouse the owner of every tag on the contact.
    """

    column: str
    format: Literal["array", "delimited"] = "delimited"
    delimiter: str = Field(default=",", min_length=1)
    on_null: NullPolicy | None = None

    _col = field_validator("column")(lambda v: _identifier(v, "column"))


class MappingConfig(_Model):
    """How a row becomes an Upsert Contact payload.

    ``null_policy: omit`` (default) leaves the CRM value alone when the source is NULL or
    blank; ``clear`` sends null (tags: an empty list) and so wipes the CRM value.
    """

    null_policy: NullPolicy = "omit"
    fields: Fields = Field(default_factory=Fields)
    custom_fields: list[CustomFieldMap] = Field(default_factory=list)
    tags: TagsMap | None = None
    dnd_settings: dict[Literal[DND_CHANNELS], str] = Field(default_factory=dict)  # type: ignore[valid-type]
    inbound_dnd: str | None = None

    @field_validator("dnd_settings")
    @classmethod
    def _dnd_cols(cls, value: dict[str, str]) -> dict[str, str]:
        for column in value.values():
            _identifier(column, "column")
        return value

    _inbound = field_validator("inbound_dnd")(lambda v: _identifier(v, "column"))

    @model_validator(mode="after")
    def _identity(self) -> MappingConfig:
        if self.fields.email is None and self.fields.phone is None:
            raise ValueError("map at least one of fields.email or fields.phone: they identify the contact")
        return self

    def column_keys(self) -> list[tuple[str, str]]:
        """``(config key, column)`` for every column the mapping reads, in a stable order."""
        keys = [(f"mapping.fields.{name}.column", fm.column) for name, fm in self.fields.items()]
        keys += [(f"mapping.custom_fields.{i}.column", cf.column) for i, cf in enumerate(self.custom_fields)]
        if self.tags:
            keys.append(("mapping.tags.column", self.tags.column))
        keys += [(f"mapping.dnd_settings.{ch}", col) for ch, col in self.dnd_settings.items()]
        if self.inbound_dnd:
            keys.append(("mapping.inbound_dnd", self.inbound_dnd))
        return keys


class QualityConfig(_Model):
    """Which checks quarantine a row (``errors``); the others only drop the bad field."""

    default_region: str = "US"
    errors: list[Literal[CHECKS]] = Field(default_factory=lambda: list(CHECKS))  # type: ignore[valid-type]
    genders: list[str] = Field(default_factory=lambda: ["male", "female", "other"])
    reject_rate_threshold: float = Field(default=0.05, ge=0, le=1)
    results_dir: str = "var/gx/validations"
    """GX validation results: a folder, relative to the task's working directory or absolute."""
    data_docs_dir: str = "var/gx/data_docs"
    """GX Data Docs (HTML), rendered by the run's finalize task from every batch's results."""

    @field_validator("results_dir", "data_docs_dir")
    @classmethod
    def _gx_folder(cls, value: str) -> str:
        # Path("s3://b/p") is a valid relative path: without this, results would silently land
        # in ./s3:/b/p on each worker's own disk.
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError(
                f"{value!r} is a URL, but GX Core 1.x keeps results and Data Docs on a filesystem only "
                "(it has no S3, GCS or Azure store backend): give the absolute path of a volume every "
                "worker mounts"
            )
        return value

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        import phonenumbers

        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {value!r}")
        return value.upper()


class StateConfig(_Model):
    """Where the ledger, quarantine, pending and run tables live (same database as the source)."""

    schema_: str | None = Field(default=None, alias="schema")
    prefix: str = ""

    _schema = field_validator("schema_")(lambda v: _identifier(v))

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_]{0,20}$", value):
            raise ValueError(f"unsafe table prefix {value!r}")
        return value


class _Channel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlackChannel(_Channel):
    type: Literal["slack"]
    conn_id: str = "slack_api_default"
    channel: str = "#data-alerts"


class EmailChannel(_Channel):
    type: Literal["email"]
    to: list[str] = Field(min_length=1)
    conn_id: str = "smtp_default"


class CustomChannel(_Channel):
    """Any notifier class; it is called with ``text=<message>`` plus ``kwargs``."""

    type: Literal["custom"]
    class_path: ImportString[type]
    kwargs: dict[str, Any] = Field(default_factory=dict)


Channel = Annotated[SlackChannel | EmailChannel | CustomChannel, Field(discriminator="type")]


class AlertsConfig(BaseModel):
    """Where alerts go (:mod:`growthhub_sync.alerts` builds the notifiers); none: an ERROR log line."""

    model_config = ConfigDict(extra="forbid")

    channels: list[Channel] = Field(default_factory=list)
    # how many distinct error messages the alert lists
    top_errors: int = Field(default=5, ge=0, le=50)


class LocationRouting(_Model):
    """The mapping form of ``locations``: each row's location id is in ``from_column``; locations
    are those the agency connection ``conn_id`` has installed (``locations.list`` overrides some)."""

    from_column: str | None = None
    conn_id: str = "growthhub_default"

    _col = field_validator("from_column")(lambda v: _identifier(v, "column"))


class DeletesConfig(_Model):
    """What a contact deleted in the warehouse becomes in GrowthHub: nothing (``ignore``), a
    ``tag`` added, or deleted (``delete``). ``detect``: rows whose ``column`` (a flag or a
    timestamp) is set in the window, or ledger keys ``missing`` from the source (full refresh
    only). A run that would touch more than ``max_fraction`` of a location's synced contacts stops."""

    mode: Literal["ignore", "tag", "delete"] = "ignore"
    detect: Literal["column", "missing"] = "column"
    column: str | None = None
    tag: str = Field(default="deleted-in-warehouse", min_length=1)
    max_fraction: float = Field(default=0.05, ge=0, le=1)

    _col = field_validator("column")(lambda v: _identifier(v, "column"))

    @model_validator(mode="after")
    def _needs_column(self) -> DeletesConfig:
        if self.mode != "ignore" and self.detect == "column" and not self.column:
            raise ValueError("column: detect: column needs the flag or timestamp column (e.g. is_deleted)")
        return self

    @property
    def flag_column(self) -> str | None:
        """The column that marks deleted rows, when deletes are detected by one (else ``None``)."""
        return self.column if self.mode != "ignore" and self.detect == "column" else None


class VerifyConfig(_Model):
    """Read-back verification: after a run, read ``sample`` (a fraction) of the contacts it created
    or updated back from GrowthHub, at least one and at most ``max_rows`` per location (``sample:
    0`` turns it off), and compare every sent field. A run whose share of differing contacts is
    over ``threshold`` alerts."""

    sample: float = Field(default=0.005, ge=0, le=1)
    max_rows: int = Field(default=200, ge=1, le=10_000)
    threshold: float = Field(default=0.0, ge=0, lt=1)


class QuotaConfig(_Model):
    """The daily quota (200,000 requests a day per location): ``daily_reserve`` requests of it are
    left for other traffic (GrowthHub's own app, other integrations); rows past it wait for the
    next day's runs."""

    daily_reserve: int = Field(default=0, ge=0)


class ShardsConfig(_Model):
    """How a run's work is spread: at most ``max`` mapped sync tasks (shards), each running up to
    ``location_concurrency`` locations at once (threads); every shard task takes a slot of ``pool``
    (one pool per GrowthHub API host caps the tasks talking to it)."""

    max: int = Field(default=16, ge=1, le=1024)
    location_concurrency: int = Field(default=8, ge=1, le=64)
    pool: str = "growthhub_api"


def _split_locations(data: Any) -> Any:
    """``locations: {from_column, conn_id, list}`` → ``locations`` (the list, each entry routed by
    the column and defaulting to the agency connection) + ``location_routing``."""
    if not isinstance(data, dict) or not isinstance(data.get("locations"), dict):
        return data
    form = dict(data["locations"])
    entries = form.pop("list", None) or []
    unknown = sorted(set(form) - {"from_column", "conn_id"})
    if unknown:
        raise ValueError(f"locations: unknown key(s) {unknown}; use from_column, conn_id and list")
    column, conn_id = form.get("from_column"), form.get("conn_id", "growthhub_default")
    if column is not None and (not isinstance(column, str) or not _IDENT.match(column)):
        raise ValueError(f"locations.from_column: unsafe column {column!r}: use letters, digits and _")
    routed = []
    for entry in entries:
        entry = {"conn_id": conn_id, **entry} if isinstance(entry, dict) else entry
        if column and isinstance(entry, dict):
            entry = {**entry, "filter": {column: entry.get("location_id"), **(entry.get("filter") or {})}}
        routed.append(entry)
    return {**data, "locations": routed, "location_routing": form}


class SyncConfig(_Model):
    source: SourceConfig = Field(default_factory=SourceConfig)
    locations: list[LocationConfig] = Field(default_factory=list)
    """Explicit locations (a list), or, in the mapping form, overrides of discovered ones."""
    location_routing: LocationRouting = Field(default_factory=LocationRouting)
    """From the mapping form of ``locations``: the routing column and the agency connection."""
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    deletes: DeletesConfig = Field(default_factory=DeletesConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    mapping: MappingConfig
    quality: QualityConfig = Field(default_factory=QualityConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    schedule: str = "@hourly"
    """Cron of growthhub_contact_sync; each run's data interval is its window."""
    lookback_minutes: int = Field(default=0, ge=0, le=7 * 24 * 60)
    """Widen each run's window backwards for rows that land in the warehouse late."""
    replay_schedule: str | None = None
    """Cron of growthhub_quarantine_replay; null: triggered by hand only."""
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    batch_size: int = Field(default=5000, ge=1, le=100_000)
    """Rows per mapped sync task: the plan cuts a run's rows into key ranges of this many."""
    chunk_size: int | None = Field(default=None, ge=1, le=100_000)
    """Rows per chunk inside a sync task: one ledger query, one GX validation, one flush of state
    per chunk. Unset: ``batch_size``, at most 5,000 (a chunk's rows and payloads stay in memory)."""

    @field_validator("schedule", "replay_schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        from croniter import croniter

        # windows come from a cron's intervals, so presets without one (@once, @continuous) are out
        presets = {"@hourly", "@daily", "@weekly", "@monthly", "@yearly"}
        if value is not None and value not in presets and not croniter.is_valid(value):
            raise ValueError(f"invalid schedule {value!r}: a cron expression or @hourly/@daily/...")
        return value

    _split = model_validator(mode="before")(classmethod(lambda cls, data: _split_locations(data)))

    @model_validator(mode="after")
    def _unique_locations(self) -> SyncConfig:
        if not self.locations and not self.location_routing.from_column:
            raise ValueError("locations: give at least one location, or locations.from_column")
        names = [loc.name for loc in self.locations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate location names: {dupes}")
        return self

    @property
    def rows_per_chunk(self) -> int:
        """``chunk_size``, else ``batch_size`` capped at 5,000."""
        return self.chunk_size if self.chunk_size is not None else min(self.batch_size, 5000)

    def location(self, name: str) -> LocationConfig:
        """A configured location by name; with ``locations.from_column``, else the location whose
        id is ``name`` (or :data:`UNROUTED`), routed by the column."""
        for loc in self.locations:
            if loc.name == name:
                return loc
        column = self.location_routing.from_column
        if column is None:
            raise ConfigError(
                f"locations: unknown location {name!r}; known: {[x.name for x in self.locations]}"
            )
        for loc in self.locations:
            if loc.location_id == name:
                return loc
        # built, not validated: an unknown id is whatever the column holds (it is quarantined)
        return LocationConfig.model_construct(
            name=name[:64],
            location_id=name,
            conn_id=self.location_routing.conn_id,
            filter={column: None if name == UNROUTED else name},
            mapping=None,
        )

    def for_location(self, location: LocationConfig) -> SyncConfig:
        """This config with the location's own mapping, if it has one."""
        if location.mapping is None:
            return self
        data = self.model_dump(by_alias=True, exclude_none=True)
        data["mapping"] = location.mapping.model_dump(by_alias=True, exclude_none=True)
        return SyncConfig.model_validate(data)

    @cached_property
    def fingerprint(self) -> str:
        """Changes whenever a change of config could change a payload (forces re-evaluation)."""
        blob = self.mapping.model_dump_json() + self.quality.model_dump_json(
            include={"default_region", "errors", "genders"}
        )
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()

    def column_keys(self) -> list[tuple[str, str]]:
        """``(config key, column)`` for every column a sync reads: key, updated-at, mapped, filters."""
        keys = [
            ("source.key_column", self.source.key_column),
            ("source.updated_at_column", self.source.updated_at_column),
            *self.mapping.column_keys(),
        ]
        if self.location_routing.from_column:
            keys.append(("locations.from_column", self.location_routing.from_column))
        for i, loc in enumerate(self.locations):
            keys += [(f"locations.{i}.filter.{col}", col) for col in loc.filter]
            if loc.mapping is not None:
                keys += [(f"locations.{i}.{key}", col) for key, col in loc.mapping.column_keys()]
        return keys

    def source_columns(self) -> list[str]:
        """Every column a sync reads, each once, in a stable order."""
        return list(dict.fromkeys(col for _, col in self.column_keys()))


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(top level)"
        lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    return f"invalid sync config {origin}:\n  " + "\n  ".join(lines)


def parse_config(data: Any, origin: str = "<dict>") -> SyncConfig:
    """Validate an already-parsed mapping (used by tests and by :func:`load_config`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid sync config {origin}: the top level must be a mapping")
    try:
        return SyncConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> SyncConfig:
    """Load the config from ``path``, else ``$GROWTHHUB_SYNC_CONFIG``, else the shipped default."""
    chosen = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)
    try:
        data = yaml.safe_load(chosen.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read sync config {chosen}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"sync config {chosen} is not valid YAML: {exc}") from None
    return parse_config(data, str(chosen))


def validate_source_columns(config: SyncConfig, engine: Engine) -> None:
    """Fail, naming the config key, when a configured table or column does not exist."""
    from sqlalchemy import inspect

    src = config.source
    try:
        real = {c["name"] for c in inspect(engine).get_columns(src.table, schema=src.schema_)}
    except Exception as exc:  # NoSuchTableError and driver errors alike
        raise ConfigError(f"source.table: table {src.table!r} not found ({type(exc).__name__})") from None
    missing = [
        f"{key}: column {col!r} not in {src.table}" for key, col in config.column_keys() if col not in real
    ]
    if missing:
        raise ConfigError("invalid sync config:\n  " + "\n  ".join(missing))
