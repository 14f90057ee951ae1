"""Deletions and erasure: a contact whose row left the warehouse (or was flagged deleted) leaves
GrowthHub too, and our state tables with it.

``deletes.mode``: ``ignore`` (nothing happens), ``tag`` (the contact stays and gets
``deletes.tag``) or ``delete`` (``DELETE /contacts/{id}``; a 404 means already gone, which is
done). ``deletes.detect``: rows whose ``deletes.column`` is set in the run's window (they are never
sent: :class:`~growthhub_sync.extract.Source` skips them), or ledger keys ``missing`` from the
source, looked for on a full refresh only (an incremental window does not see the whole source).

A run that would delete or tag more than ``deletes.max_fraction`` of a location's synced contacts
(its ledger rows) sends nothing and fails the location (:class:`MassDeleteError`), unless the run
allows it (``allow_mass_delete``): an emptied or broken source table must not erase a CRM.

A deleted or tagged contact's ledger row, identities, quarantine and pending rows are removed,
and the row counts as the outcome ``deleted``. A tagged contact leaves the ledger too: it is no
longer synced, so a later full refresh does not tag it (or count it against the guard) again, and
if its row comes back it is sent again rather than skipped as unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import String, cast, exists, func, select, union

from growthhub_sync import state
from growthhub_sync.config import ConfigError
from growthhub_sync.extract import Source, Window
from growthhub_sync.outcomes import Summary
from growthhub_sync.upsert import UpserterSource, resolve_upserter

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.batch import SyncOptions
    from growthhub_sync.config import LocationConfig, SyncConfig

log = logging.getLogger(__name__)

_PART = 500  # contacts sent between two state transactions: bounds what a killed task sends again
_DONE = {"delete": "deleted", "tag": "tagged"}


class Eraser(Protocol):
    """What deleting or tagging a contact needs of GrowthHub (the hook)."""

    def delete_contact(self, contact_id: str) -> bool: ...

    def get_contact(self, contact_id: str) -> dict[str, Any]: ...

    def upsert_contact(self, payload: dict[str, Any]) -> Any: ...


class MassDeleteError(ConfigError):
    """The run would delete or tag more than ``deletes.max_fraction`` of a location's contacts."""

    failure_kind = "deletes"


def doomed(
    conn: Connection, config: SyncConfig, location: LocationConfig, win: Window, full_refresh: bool
) -> dict[str, str | None]:
    """Source key → contact id of the location's synced contacts this run must delete or tag."""
    deletes = config.deletes
    if deletes.mode == "ignore" or (deletes.detect == "missing" and not full_refresh):
        return {}
    led = state.state_tables(config.state).ledger
    source = _source(conn, config, location)
    if source.deleted is not None:
        gone = led.c.source_key.in_(_flagged(source, win))
    else:
        gone = ~exists().where(cast(source.key, String) == led.c.source_key, *source.located)
    stmt = select(led.c.source_key, led.c.contact_id).where(led.c.location == location.name, gone)
    return {k: contact for k, contact in conn.execute(stmt)}


def held(conn: Connection, config: SyncConfig, location: LocationConfig, win: Window) -> list[str]:
    """Keys of rows flagged deleted in the window that never synced but wait in the quarantine or
    pending table: they are not sent any more, and their rows there (emails, phones) must go too."""
    if config.deletes.flag_column is None:
        return []
    tables = state.state_tables(config.state)
    flagged = _flagged(_source(conn, config, location), win)
    synced = select(tables.ledger.c.source_key).where(tables.ledger.c.location == location.name)
    waiting = [
        select(t.c.source_key).where(t.c.location == location.name, t.c.source_key.in_(flagged))
        for t in (tables.quarantine, tables.pending)
    ]
    return sorted(set(conn.execute(union(*waiting)).scalars()) - set(conn.execute(synced).scalars()))


def _source(conn: Connection, config: SyncConfig, location: LocationConfig) -> Source:
    tables = state.state_tables(config.state)
    return Source(config.for_location(location), location, tables, conn.dialect.name)


def _flagged(source: Source, win: Window) -> Select[Any]:
    """Keys (as strings) of the location's rows flagged deleted in the window."""
    return select(cast(source.key, String)).where(source.in_window(win), source.deleted, *source.located)


def check_fraction(
    conn: Connection, config: SyncConfig, location: LocationConfig, doomed_rows: int, allowed: bool
) -> None:
    """Raise :class:`MassDeleteError` when ``doomed_rows`` is over ``deletes.max_fraction`` of the
    location's synced contacts and the run does not allow it."""
    led = state.state_tables(config.state).ledger
    synced = conn.execute(select(func.count()).where(led.c.location == location.name)).scalar_one()
    limit = config.deletes.max_fraction
    if allowed or doomed_rows <= limit * synced:
        return
    raise MassDeleteError(
        f"deletes: {doomed_rows} of the {synced} contacts synced to location {location.name} "
        f"({doomed_rows / synced:.1%}) would be {_DONE[config.deletes.mode]}, over deletes.max_fraction "
        f"{limit:.1%}; nothing was sent: check the source table, or trigger the run with allow_mass_delete"
    )


def apply_deletes(
    config: SyncConfig,
    location: LocationConfig,
    win: Window,
    o: SyncOptions,
    engine: Engine,
    eraser: UpserterSource = None,
) -> dict[str, Any] | None:
    """Delete or tag the location's contacts gone from the warehouse, and erase their state.

    Rows flagged deleted that never synced but wait in the quarantine or pending table (:func:`held`)
    are erased from our tables and counted too. Returns the batch summary (extracted = deleted),
    ``None`` when there is nothing to do.
    A dry run counts them and sends nothing. Raises :class:`MassDeleteError` before sending any.
    """
    with engine.connect() as conn:
        contacts = doomed(conn, config, location, win, o.full_refresh)
        if contacts:
            check_fraction(conn, config, location, len(contacts), o.allow_mass_delete)
        waiting = held(conn, config, location, win)
    if not contacts and not waiting:
        return None
    rows = len(contacts) + len(waiting)
    summary = Summary(extracted=rows, deleted=rows, max_samples=0)
    if o.dry_run:
        return summary.as_dict()
    send = _sender(resolve_upserter(eraser, location), config.deletes.mode, config.deletes.tag)  # type: ignore[arg-type]
    keys = [*sorted(contacts), *waiting]
    for i in range(0, len(keys), _PART):  # one request at a time: the limiter, not threads, sets the pace
        part = keys[i : i + _PART]
        for key in part:
            send(contacts.get(key))
        with engine.begin() as conn:
            _forget(state.StateStore(conn, state.state_tables(config.state), location.name, o.run_id), part)
    done = _DONE[config.deletes.mode]
    log.info("location %s: %d contact(s) %s in GrowthHub", location.name, len(contacts), done)
    return summary.as_dict()


def _sender(client: Eraser, mode: str, tag: str) -> Callable[[str | None], None]:
    """What deletes or tags one contact (by id; ``None``: the ledger knows none, nothing to send).

    A tag is added by an upsert whose ``tags`` overwrite all the contact's tags: its own are read
    first (``GET``) and sent back with the tag. A contact gone already (404) is done either way.
    """
    from growthhub_provider.client import GrowthHubNotFound

    def delete(contact_id: str | None) -> None:
        if contact_id:
            client.delete_contact(contact_id)

    def add_tag(contact_id: str | None) -> None:
        try:
            contact = client.get_contact(contact_id) if contact_id else None
        except GrowthHubNotFound:
            return
        if contact is None:
            return
        identity = {name: contact[name] for name in ("email", "phone") if contact.get(name)}
        client.upsert_contact({**identity, "tags": list(dict.fromkeys([*(contact.get("tags") or []), tag]))})

    return delete if mode == "delete" else add_tag


def _forget(store: state.StateStore, keys: Sequence[str]) -> None:
    """The rows of ``keys`` are no longer synced: their ledger, identity, quarantine and pending
    rows go (the last three hold emails and phones)."""
    q = store.tables.quarantine
    store.conn.execute(q.delete().where(q.c.location == store.location, q.c.source_key.in_(list(keys))))
    store.clear_pending(keys)
    store.drop_from_ledger(keys)
    store.release_owned(keys)
