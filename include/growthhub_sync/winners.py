"""Plan-time winners: each identity's winner is decided for the whole window before any batch sends.

Batches decide ownership chunk by chunk (:mod:`~growthhub_sync.identity`), so an older row in an
early batch was sent and then displaced by its newer duplicate in a later batch: one wasted
upsert per duplicate, and the CRM showed the older values meanwhile. The plan therefore makes one
pass over the window's normalised identities (:func:`plan_winners`), newest row first (the order
of :func:`~growthhub_sync.identity.rank`): a row naming an email or phone a row before it won is
a *loser*. The losers are kept in a per-run table keyed by (run, location, key), which each
batch probes by primary key once per chunk (:meth:`PlannedLosers.hold_back`): a loser is
quarantined as ``duplicate_identity`` of its winner and never sent, whatever the batch order.
Rows of later runs and races between runs are still settled by the identities table.

Winners that will not be sent keep no losers: the plan runs the quality checks on the winners
that have losers, and asks the identities table whether an owner outside the window outranks
them; their losers are decided by their batches as before. A winner the plan could not see fail
(the API refused it) would leave its losers stranded: :func:`release_stranded` has the run's
finalize decide them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, String, Table, and_, cast, exc, exists, false, null, select

from growthhub_sync.checks import checker_for
from growthhub_sync.extract import Source, stream
from growthhub_sync.identity import Candidate, names, rank
from growthhub_sync.keyed import rows_by_key
from growthhub_sync.mapping import Mapper
from growthhub_sync.outcomes import IDENTITY_FREED, QuarantineRow
from growthhub_sync.state import StateStore, state_tables

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.config import LocationConfig, SyncConfig
    from growthhub_sync.extract import NarrowRow, Window
    from growthhub_sync.state import StateTables

log = logging.getLogger(__name__)

_ROWS = 5000
"""Window rows per fetch and normalisation round; losers per insert; keys per probe."""


def losers_table(tables: StateTables) -> Table:
    """The per-run table of planned losers, beside the other state tables (same schema and prefix)."""
    md = tables.metadata
    name = tables.ledger.name.replace("growthhub_sync_ledger", "growthhub_sync_losers")
    existing = md.tables.get(f"{md.schema}.{name}" if md.schema else name)
    if existing is not None:
        return existing
    return Table(
        name,
        md,
        Column("run_id", String(250), primary_key=True),
        Column("location", String(64), primary_key=True),
        Column("source_key", String(255), primary_key=True),
        Column("duplicate_of", String(255), nullable=False),
    )


@dataclass(frozen=True)
class WinnerPass:
    """What :func:`plan_winners` found (logged; the benchmark prints it)."""

    rows: int
    identities: int
    losers: int
    """Rows held back: quarantined by their batch as duplicates, never sent."""
    left_to_batches: int
    """Losers of a winner that will not be sent (it fails a check, or an owner from the identities
    table outranks it): their batches decide them, as before."""
    seconds: float


def plan_winners(
    config: SyncConfig,
    location: LocationConfig,
    engine: Engine,
    window: Window,
    *,
    run_id: str,
    full_refresh: bool = False,
) -> WinnerPass:
    """Decide the winner of every identity of the run's rows (window + pending), store the losers.

    Rows are read newest first (latest ``updated_at``, then the row in the ledger, then the key,
    as :func:`~growthhub_sync.identity.rank` orders them), so the first row naming an identity
    wins it; a row naming one already won loses and claims none of its own, as a chunk's ranking
    does. A winner that will not be sent keeps no losers (their batches decide them): one the
    quality checks quarantine, or one an owner in the identities table outranks (a newer row
    outside the window). Safe to repeat: a retried plan replaces the run's losers.
    """
    started = time.perf_counter()
    config = config.for_location(location)
    tables = state_tables(config.state)
    table = losers_table(tables)
    _create(engine, table)
    source = Source(config, location, tables, engine.dialect.name)
    mapper = Mapper(config, source.columns)
    fields = config.mapping.fields
    contact = [source.table.c[f.column] if f else null() for f in (fields.email, fields.phone)]
    with engine.connect() as conn:
        rows, claimed, losers = _newest_first(conn, source, mapper, tables, contact, window, full_refresh)
        beaten = _outranked(StateStore(conn, tables, location.name), source, mapper, claimed, losers)
        beaten |= _failing(conn, config, location, source, mapper, set(losers.values()) - beaten)
    held = {k: w for k, w in losers.items() if w not in beaten}
    with engine.begin() as conn:
        forget_run(conn, table, run_id, location.name)
        _forget_finished(conn, table, tables, location.name)
        for part in _parts(sorted(held.items())):
            conn.execute(
                table.insert(),
                [
                    {"run_id": run_id, "location": location.name, "source_key": k, "duplicate_of": w}
                    for k, w in part
                ],
            )
    result = WinnerPass(rows, len(claimed), len(held), len(losers) - len(held), time.perf_counter() - started)
    log.info(
        "winners %s: %d rows, %d identities, %d duplicates held back, %d left to the batches, %.2f s",
        location.name, result.rows, result.identities, result.losers, result.left_to_batches, result.seconds,
    )  # fmt: skip
    return result


def _newest_first(
    conn: Connection,
    source: Source,
    mapper: Mapper,
    tables: StateTables,
    contact: Sequence[ColumnElement[Any]],
    window: Window,
    full_refresh: bool,
) -> tuple[int, dict[str, str], dict[str, str]]:
    """One streamed pass over the run's rows, best-ranked first: (rows read, identity → winner,
    loser → winner). Only keys, emails and phones cross the wire; the database sorts."""
    led = tables.ledger
    key = cast(source.key, String)
    in_ledger = false() if full_refresh else led.c.payload_hash.is_not(None)
    by_key = key.collate("C") if conn.dialect.name == "postgresql" else key  # Python's order on ties
    stmt = (
        select(key, *contact)
        .select_from(
            source.table.outerjoin(led, and_(led.c.location == source.location.name, led.c.source_key == key))
        )
        .where(source.scope(window))
        .order_by(source.updated_at.desc(), *([] if full_refresh else [in_ledger.desc()]), by_key.desc())
    )
    claimed: dict[str, str] = {}
    losers: dict[str, str] = {}
    rows = 0
    for chunk in stream(conn, stmt, _ROWS):
        rows += len(chunk)
        found = mapper.identities([(email, phone) for _, email, phone in chunk])
        for (k, _, _), ids in zip(chunk, found, strict=True):
            mine = [f"{kind}:{value}" for kind, value in ids]
            winner = next((claimed[n] for n in mine if n in claimed), None)
            if winner is None:
                claimed.update(dict.fromkeys(mine, k))
            else:
                losers[k] = winner
    return rows, claimed, losers


def _outranked(
    store: StateStore, source: Source, mapper: Mapper, claimed: Mapping[str, str], losers: Mapping[str, str]
) -> set[str]:
    """Winners with losers that an owner in the identities table outranks on a shared identity
    (the owner's current row, as the batch will compare them): they lose in their batch."""
    with_losers = set(losers.values())
    wanted = {n: k for n, k in claimed.items() if k in with_losers}
    rivals = {n: o for n, o in store.owners_of(wanted, lock=False).items() if o not in (None, wanted[n])}
    if not rivals:
        return set()
    rows = _rows_of(store.conn, source, {*rivals.values(), *(wanted[n] for n in rivals)})
    ids = mapper.identities([(r.email, r.phone) for r in rows.values()])
    found = {k: names(i) for k, i in zip(rows, ids, strict=True)}
    beaten = set()
    for n, owner in rivals.items():
        o, w = rows.get(str(owner)), rows.get(wanted[n])
        if o is None or w is None or n not in found[str(owner)]:
            continue  # the owner left the source or gave the identity up: the winner takes it
        if _rank(o) > _rank(w):
            beaten.add(wanted[n])
    return beaten


def _failing(
    conn: Connection,
    config: SyncConfig,
    location: LocationConfig,
    source: Source,
    mapper: Mapper,
    keys: Iterable[str],
) -> set[str]:
    """Of the winners ``keys``, those the quality checks will quarantine: their batch sends
    nothing, so their losers are left to the batches, which decide them as before. Only winners
    with losers are checked (a few per cent of a first load), with the batches' own suite."""
    errors = set(config.quality.errors) | {"identity"}
    failing: set[str] = set()
    for part in _parts(sorted(keys)):
        full = list(conn.execute(source.by_keys(list(part), full=True)))
        if not full:
            continue
        batch = mapper.map(full, location.location_id)
        checker = checker_for(config, tuple(batch.frame.columns), False)
        result = checker.validate(batch.frame, batch.reasons, "winners")
        failing.update(batch.keys[j] for j, failed in result.failures.items() if errors & set(failed))
    return failing


def _rows_of(conn: Connection, source: Source, keys: Iterable[str]) -> dict[str, NarrowRow]:
    """The current narrow source rows of ``keys`` (rows gone from the source are left out)."""
    wanted = sorted(keys)
    out: dict[str, NarrowRow] = {}
    for part in _parts(wanted):
        out.update((str(r.source_key), r) for r in conn.execute(source.by_keys(list(part))))  # type: ignore[misc]
    return out


def _rank(row: NarrowRow) -> tuple[str, bool, str]:
    return rank(row.updated_at, row.ledger_payload_hash is not None, str(row.source_key))


def _parts(seq: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), _ROWS):
        yield seq[i : i + _ROWS]


def _create(engine: Engine, table: Table) -> None:
    """Create the losers table if missing; plans of several runs may race to it (as in ``ensure_state``)."""
    for attempt in range(3):
        try:
            table.create(engine, checkfirst=True)
            return
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError):
            if attempt == 2:
                raise


def _forget_finished(conn: Connection, table: Table, tables: StateTables, location: str) -> None:
    """Drop the losers of the location's runs that finished without their finalize dropping them
    (a run row no longer ``running``): the table holds only runs in progress."""
    runs = tables.runs
    finished = exists().where(
        runs.c.run_id == table.c.run_id, runs.c.location == table.c.location, runs.c.status != "running"
    )
    conn.execute(table.delete().where(table.c.location == location, finished))


def forget_run(conn: Connection, table: Table, run_id: str, location: str) -> None:
    """Drop a run's losers (a retried plan, a finished run)."""
    conn.execute(table.delete().where(table.c.run_id == run_id, table.c.location == location))


class PlannedLosers:
    """A batch's view of its run's losers: :meth:`hold_back` is the batch runner's ``hold_back``."""

    def __init__(self, tables: StateTables, run_id: str, location: str) -> None:
        self.table, self.run_id, self.location = losers_table(tables), run_id, location
        self._planned: bool | None = None
        """Whether the table exists: looked up once (a dry run or an older plan made none)."""

    def winners_of(self, conn: Connection, keys: Sequence[str]) -> dict[str, str]:
        """Loser → winner for the planned losers among ``keys`` (a primary-key probe per key)."""
        t = self.table
        if self._planned is None:
            self._planned = _exists(conn, t)
        if not keys or not self._planned:
            return {}
        where = [t.c.run_id == self.run_id, t.c.location == self.location]
        out: dict[str, str] = {}
        for part in _parts(sorted(set(keys))):
            query = rows_by_key(
                conn.dialect.name, t.c.source_key, part, [t.c.source_key, t.c.duplicate_of], where
            )
            out.update((k, w) for k, w in conn.execute(query))
        return out

    def hold_back(
        self, store: StateStore, candidates: list[Candidate], write: bool
    ) -> tuple[list[Candidate], list[QuarantineRow]]:
        """Split a chunk's candidates into the rows to decide as usual and the planned losers,
        quarantined as duplicates of their winners. A loser synced in an earlier run gives its
        contact up now (ledger row and identities), as a displaced owner does, so its winner
        finds the identity free and nothing to resend; rows that had lost to it are decided again."""
        winners = self.winners_of(store.conn, [c.key for c in candidates])
        if not winners:
            return candidates, []
        held = [
            QuarantineRow.duplicate(c.key, winners[c.key], c.payload, c.source_hash)
            for c in candidates
            if c.key in winners
        ]
        if write:
            given_up = list(winners)
            store.drop_from_ledger(given_up)
            store.release_owned(given_up)
            again = [k for k in store.duplicates_of(given_up) if k not in winners]
            store.mark_pending(dict.fromkeys(again, IDENTITY_FREED))
        return [c for c in candidates if c.key not in winners], held


def release_stranded(engine: Engine, tables: StateTables, location: str, run_id: str) -> int:
    """Planned losers quarantined as duplicates of a winner that owns nothing now (it failed a
    check, was refused, or lost to another row): pending for the run's finalize to decide again.
    One statement over the run's losers; returns how many."""
    t, q, ids = losers_table(tables), tables.quarantine, tables.identities
    if not _exists(engine, t):
        return 0
    stranded = (
        select(t.c.source_key)
        .join(
            q,
            and_(
                q.c.location == t.c.location,
                q.c.source_key == t.c.source_key,
                q.c.status == "open",
                q.c.duplicate_of == t.c.duplicate_of,
            ),
        )
        .where(
            t.c.run_id == run_id,
            t.c.location == location,
            ~exists().where(ids.c.location == t.c.location, ids.c.source_key == t.c.duplicate_of),
        )
    )
    with engine.begin() as conn:
        keys = list(conn.execute(stranded).scalars())
        StateStore(conn, tables, location, run_id=run_id).mark_pending(dict.fromkeys(keys, IDENTITY_FREED))
    if keys:
        log.info("%d duplicates of winners that did not sync are decided again", len(keys))
    return len(keys)


def finish_run(engine: Engine, tables: StateTables, location: str, run_id: str) -> None:
    """The run's finalize is done with its losers: drop them."""
    t = losers_table(tables)
    if _exists(engine, t):
        with engine.begin() as conn:
            forget_run(conn, t, run_id, location)


def _exists(bind: Engine | Connection, table: Table) -> bool:
    """The losers table exists (a run planned before this release, or a dry run, has none)."""
    from sqlalchemy import inspect

    return inspect(bind).has_table(table.name, schema=table.schema)
