"""The upsert stage's seam: what the pipeline needs from a destination, and the GrowthHub one.

A destination is anything with :meth:`Upserter.upsert_contacts`: it takes ``(source key,
payload)`` pairs and yields one :class:`~growthhub_provider.client.UpsertOutcome` per row, in
any order. Tests inject fakes; the DAGs use :func:`growthhub_upserter`, the Airflow hook of the
location's connection (imported only when a row is actually sent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from growthhub_sync.config import ConfigError, MissingConnectionError

if TYPE_CHECKING:
    from growthhub_provider.client import UpsertOutcome
    from growthhub_sync.config import LocationConfig


class Upserter(Protocol):
    """Sends rows to the CRM within its limits; owes exactly one outcome per row."""

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[UpsertOutcome]: ...


UpserterFactory = Callable[["LocationConfig"], Upserter]
UpserterSource = Upserter | UpserterFactory | None
"""What a caller may pass: an upserter, a factory taking the location, or ``None`` (GrowthHub)."""


def growthhub_upserter(location: LocationConfig) -> Upserter:
    """The GrowthHub hook of the location's connection, limited and keyed on the config's location id."""
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    return GrowthHubHook(growthhub_conn_id=location.conn_id, location_id=location.location_id)


def resolve_upserter(source: UpserterSource, location: LocationConfig) -> Upserter:
    if source is None:
        return growthhub_upserter(location)
    if hasattr(source, "upsert_contacts"):
        return source  # type: ignore[return-value]
    return source(location)  # type: ignore[operator]


def require_connection(location: LocationConfig) -> None:
    """
    Fail, naming the key, when the location's Airflow connection is not defined or its settings
    (TLS, coordination, location id) are wrong: at plan time, not in every mapped batch.
    """
    from airflow.sdk import BaseHook

    from growthhub_provider.client import GrowthHubConfigError
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    where = f"locations[{location.name}].conn_id"
    try:
        BaseHook.get_connection(location.conn_id)
    except Exception as exc:  # the Task SDK and the secrets backends raise their own kinds
        raise MissingConnectionError(where, location.conn_id, type(exc).__name__) from None
    hook = GrowthHubHook(growthhub_conn_id=location.conn_id, location_id=location.location_id)
    try:
        hook.coordination  # noqa: B018 - resolving it checks the connection's settings
    except GrowthHubConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_access(location: LocationConfig) -> None:
    """
    One cheap live request with the location's connection (a ``GET`` of a contact that does not
    exist), so a bad token or an API version GrowthHub refuses fails the plan before any batch
    sends: raises the hook's ``GrowthHubAuthError`` / ``GrowthHubConfigError``.
    """
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    GrowthHubHook(growthhub_conn_id=location.conn_id, location_id=location.location_id).client.verify_access()
