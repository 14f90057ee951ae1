"""Failures no retry can fix, recorded where the run's other tasks and its failure alert read them.

A wrong token, an API version GrowthHub refuses, or a config error fails every batch of a location
alike. The first task that meets one records it in the location's run row (``details.failure``,
with a fingerprint of the credentials that failed), so that:

- the run's other mapped batches of that location send nothing more with the same credentials
  (:class:`CredentialsGuard`), and run normally once the connection was changed and they are
  cleared;
- the DAG's failure alert, which runs without the exception, names the cause (:meth:`RunFailure.headline`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import and_, select, update

from growthhub_sync import state
from growthhub_sync.config import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.config import LocationConfig

log = logging.getLogger(__name__)

_MAX_MESSAGE = 300
ALL_LOCATIONS = "all"
"""The location of a failure before a run knows its locations (its plan)."""


@dataclass(frozen=True)
class RunFailure:
    """Why one location's part of a run failed for good.

    :param kind: ``connection`` (GrowthHub refused the credentials or settings: 401, 403, API
        version, OAuth refresh), ``config`` (the sync config, e.g. a mapped column missing) or
        ``deletes`` (the mass-delete guard held the location back: its message says what to do).
    :param credentials: fingerprint of the connection that failed (``connection`` only).
    """

    kind: Literal["connection", "config", "deletes"]
    location: str
    message: str
    conn_id: str | None = None
    credentials: str | None = None

    def headline(self) -> str:
        """The alert's first line: the cause and what to do."""
        if self.kind == "deletes":
            return f"mass delete held back for {self._where()}: {self.message}"
        if self.kind == "config":
            return f"config error for {self._where()}: {self.message}; fix the config, then clear the run"
        return (
            f"{self._connection_cause()} for {self._where()}: "
            f"fix connection {self.conn_id}, then clear the run"
        )

    def _where(self) -> str:
        return "all locations" if self.location == ALL_LOCATIONS else f"location {self.location}"

    def _connection_cause(self) -> str:
        status = self.message[:4]
        if status == "401:":
            return "GrowthHub rejected the token (401)"
        if status == "403:":
            return "GrowthHub refused the token for this location or scope (403)"
        return f"GrowthHub refused the connection ({self.message})"


def failure_of(
    error: BaseException, location: LocationConfig | None, conn_id: str | None = None
) -> RunFailure | None:
    """The :class:`RunFailure` an error means, or ``None`` when a retry may help.

    Without a ``location`` (a run's plan, before it knows them) the failure is of
    :data:`ALL_LOCATIONS`, with the agency connection ``conn_id``.
    """
    from growthhub_provider.client import GrowthHubAuthError  # GrowthHubConfigError included

    message = " ".join(str(error).split())[:_MAX_MESSAGE]
    name = location.name if location else ALL_LOCATIONS
    if isinstance(error, GrowthHubAuthError):
        conn = location.conn_id if location else conn_id
        location_id = location.location_id if location else None
        fingerprint = credentials_fingerprint(conn, location_id) if conn else None
        return RunFailure("connection", name, message, conn, fingerprint)
    if isinstance(error, ConfigError):
        return RunFailure(error.failure_kind, name, message)  # type: ignore[arg-type]
    return None


def credentials_fingerprint(conn_id: str, location_id: str | None = None) -> str | None:
    """A hash of what the Airflow connection authenticates with (host, token, extras) for
    ``location_id``, never the secrets themselves; ``None`` when the connection cannot be read.

    The location is part of it: an agency connection mints one token per location, so one
    location's refusal says nothing of the others sharing the connection.
    """
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # the Task SDK and the secrets backends raise their own kinds
        return None
    material = [conn.host, conn.port, conn.password, conn.extra_dejson, location_id]
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_failure(engine: Engine, tables: state.StateTables, run_id: str, failure: RunFailure) -> None:
    """Put the failure in the location's run row (creating the row if the plan had not yet)."""
    with engine.begin() as conn:
        _set(conn, tables, run_id, failure.location, asdict(failure))


def recorded_failures(conn: Connection, tables: state.StateTables, run_id: str) -> list[RunFailure]:
    """The failures recorded for a run, one per failed location."""
    runs = tables.runs
    rows = conn.execute(select(runs.c.details).where(runs.c.run_id == run_id).order_by(runs.c.location))
    return [RunFailure(**r.details["failure"]) for r in rows if (r.details or {}).get("failure")]


def forget_failure(conn: Connection, tables: state.StateTables, run_id: str, location: str) -> None:
    """The location's setup was checked again and passed: its recorded failure is history."""
    _set(conn, tables, run_id, location, None)


def _set(
    conn: Connection, tables: state.StateTables, run_id: str, location: str, failure: dict[str, Any] | None
) -> None:
    runs = tables.runs
    where = and_(runs.c.run_id == run_id, runs.c.location == location)
    row = conn.execute(select(runs.c.details).where(where).with_for_update()).first()
    details = {k: v for k, v in ((row.details if row else None) or {}).items() if k != "failure"}
    values: dict[str, Any] = {"details": details}
    if failure is not None:
        values = {"details": {**details, "failure": failure}, "status": "failed"}
    if row is not None:
        conn.execute(update(runs).where(where).values(**values))
    elif failure is not None:
        row = {"run_id": run_id, "location": location, "started_at": state.utcnow(), **values}
        state.write_run(conn, tables, row)


class CredentialsGuard:
    """Stops a batch before it sends with credentials another batch of the run saw refused.

    :param fingerprint: of the connection this batch would send with (:func:`credentials_fingerprint`).
    """

    def __init__(
        self, engine: Engine, tables: state.StateTables, run_id: str, location: str, fingerprint: str
    ) -> None:
        self.engine, self.tables, self.run_id = engine, tables, run_id
        self.location, self.fingerprint = location, fingerprint

    def check(self) -> None:
        """Raise the recorded error if these credentials failed in this run; forget it if the
        connection changed since (the operator fixed it and cleared the failed tasks)."""
        from growthhub_provider.client import GrowthHubAuthError

        with self.engine.begin() as conn:
            found = {f.location: f for f in recorded_failures(conn, self.tables, self.run_id)}
            failure = found.get(self.location)
            if failure is None or failure.kind != "connection":
                return
            if failure.credentials == self.fingerprint:
                log.error("a batch of run %s was refused with these credentials: not sending", self.run_id)
                raise GrowthHubAuthError(failure.message)
            log.info("the connection changed since run %s recorded: %s", self.run_id, failure.message)
            forget_failure(conn, self.tables, self.run_id, self.location)
