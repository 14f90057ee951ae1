"""Sync state kept next to the data: ledger, quarantine, pending rows and the run log.

SQLAlchemy Core only, one code path for PostgreSQL and SQLite; every write is an upsert
(``INSERT ... ON CONFLICT``) so a retried task or a re-run creates no duplicate row.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    exc,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.config import StateConfig

_OPEN = text("status = 'open'")  # a literal: ON CONFLICT must repeat the partial index's predicate verbatim
_CHUNK = 2000  # keys per IN (...) list: well under SQLite's variable limit


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class StateTables:
    metadata: MetaData
    ledger: Table
    quarantine: Table
    pending: Table
    runs: Table
    identities: Table


def state_tables(cfg: StateConfig) -> StateTables:
    """Describe the state tables for a schema/prefix (nothing is created here)."""
    md = MetaData(schema=cfg.schema_)
    p = cfg.prefix
    ts = DateTime(timezone=True)
    ledger = Table(
        f"{p}growthhub_sync_ledger",
        md,
        Column("location", String(64), primary_key=True),
        Column("source_key", String(255), primary_key=True),
        Column("contact_id", String(64)),
        Column("payload_hash", String(32), nullable=False),
        # hash of the raw source values + config fingerprint: lets an untouched-but-bumped row
        # be recognised without mapping it; NULL forces the full path (e.g. after quarantine)
        Column("source_hash", String(32)),
        Column("first_synced_at", ts, nullable=False),
        Column("last_synced_at", ts, nullable=False),
        Column("last_run_id", String(250)),
    )
    quarantine = Table(
        f"{p}growthhub_quarantine",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("location", String(64), nullable=False),
        Column("source_key", String(255), nullable=False),
        Column("stage", String(16), nullable=False),
        Column("http_status", Integer),
        Column("errors", JSON, nullable=False),
        Column("payload", JSON),
        # source hash of the failing row: the same row in a later run is still quarantined
        # without being checked or sent again (a duplicate only while its winner outranks it)
        Column("source_hash", String(32)),
        Column("duplicate_of", String(255)),
        Column("dag_id", String(250)),
        Column("run_id", String(250)),
        Column("first_seen_at", ts, nullable=False),
        Column("last_seen_at", ts, nullable=False),
        Column("attempts", Integer, nullable=False, default=1),
        Column("status", String(16), nullable=False, default="open"),
        Column("resolved_at", ts),
    )
    Index(
        f"{p}ix_growthhub_quarantine_open",
        quarantine.c.location,
        quarantine.c.source_key,
        unique=True,
        postgresql_where=_OPEN,
        sqlite_where=_OPEN,
    )
    pending = Table(
        f"{p}growthhub_sync_pending",
        md,
        Column("location", String(64), primary_key=True),
        Column("source_key", String(255), primary_key=True),
        Column("reason", Text, nullable=False),
        Column("since", ts, nullable=False),
        Column("last_run_id", String(250)),
        Column("attempts", Integer, nullable=False, default=1),
    )
    runs = Table(
        f"{p}growthhub_sync_runs",
        md,
        Column("run_id", String(250), primary_key=True),
        Column("location", String(64), primary_key=True),
        Column("dag_id", String(250)),
        Column("window_start", ts),
        Column("window_end", ts),
        Column("dry_run", Boolean, nullable=False, default=False),
        Column("full_refresh", Boolean, nullable=False, default=False),
        *(Column(n, Integer, nullable=False, default=0) for n in RUN_COUNTS),
        Column("warnings", Integer, nullable=False, default=0),
        Column("batches", Integer, nullable=False, default=0),
        Column("invariant_ok", Boolean),
        Column("status", String(16), nullable=False),
        Column("details", JSON),
        Column("started_at", ts),
        Column("finished_at", ts),
    )
    # one owner per email / phone and location, across chunks, mapped tasks and runs: the API
    # merges rows sharing an identity into one contact, so only the owner may be sent
    identities = Table(
        f"{p}growthhub_identities",
        md,
        Column("location", String(64), primary_key=True),
        Column("identity", String(512), primary_key=True),
        Column("source_key", String(255)),  # NULL only inside a claiming transaction (a placeholder)
        Column("claimed_at", ts),
        Column("last_run_id", String(250)),
    )
    Index(f"{p}ix_growthhub_identities_owner", identities.c.location, identities.c.source_key)
    return StateTables(md, ledger, quarantine, pending, runs, identities)


RUN_COUNTS = ("extracted", "unchanged", "created", "updated", "quarantined", "rejected", "deferred")


def ensure_state(engine: Engine, tables: StateTables) -> None:
    """Create the state tables if missing; safe when parallel tasks race to do it.

    On SQLite it also switches the file to WAL, so the pipeline can write state while its
    extract cursor is still reading (the journal mode persists in the file).
    """
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    if tables.metadata.schema and engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{tables.metadata.schema}"'))
    for attempt in range(3):
        try:
            tables.metadata.create_all(engine, checkfirst=True)
            return
        except (exc.IntegrityError, exc.ProgrammingError, exc.OperationalError):
            if attempt == 2:
                raise


def analyze(engine: Engine, tables: StateTables) -> None:
    """Refresh planner statistics after a run wrote many state rows (the extract joins them)."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        for t in (tables.ledger, tables.quarantine, tables.pending, tables.identities):
            name = f'"{t.schema}"."{t.name}"' if t.schema else f'"{t.name}"'
            conn.exec_driver_sql(f"ANALYZE {name}")


def _insert(conn: Connection, table: Table) -> Any:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"state tables need PostgreSQL or SQLite, not {dialect}")


def _chunks(seq: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def upsert_ledger(conn: Connection, t: StateTables, rows: Sequence[Mapping[str, Any]]) -> None:
    """Record synced rows.

    ``rows`` carry ``location, source_key, contact_id, payload_hash, source_hash, last_synced_at``
    and ``last_run_id``.
    """
    if not rows:
        return
    ins = _insert(conn, t.ledger)
    stmt = ins.on_conflict_do_update(
        index_elements=[t.ledger.c.location, t.ledger.c.source_key],
        set_={
            "contact_id": ins.excluded.contact_id,
            "payload_hash": ins.excluded.payload_hash,
            "source_hash": ins.excluded.source_hash,
            "last_synced_at": ins.excluded.last_synced_at,
            "last_run_id": ins.excluded.last_run_id,
        },
    )
    conn.execute(stmt, [{**r, "first_synced_at": r["last_synced_at"]} for r in rows])


def refresh_source_hashes(conn: Connection, t: StateTables, location: str, hashes: Mapping[str, str]) -> None:
    """Store the source hash of rows found unchanged the slow way, so next time the fast path sees them."""
    if not hashes:
        return
    led = t.ledger
    stmt = (
        update(led)
        .where(led.c.location == location, led.c.source_key == bindparam("k"))
        .values(source_hash=bindparam("h"))
    )
    conn.execute(stmt, [{"k": k, "h": h} for k, h in hashes.items()])


def forget_source_hashes(conn: Connection, t: StateTables, location: str, keys: Sequence[str]) -> None:
    """Force the full path for rows that failed, so a later revert to the synced values resolves them."""
    led = t.ledger
    for part in _chunks(keys):
        conn.execute(
            update(led)
            .where(
                led.c.location == location, led.c.source_key.in_(list(part)), led.c.source_hash.is_not(None)
            )
            .values(source_hash=None)
        )


def quarantine_rows(
    conn: Connection, t: StateTables, rows: Sequence[Mapping[str, Any]], *, now: datetime
) -> None:
    """Open or update one quarantine row per (location, source key).

    ``rows`` carry ``location, source_key, stage, http_status, errors, payload, dag_id, run_id``.
    ``attempts`` grows once per run: a retried task of the same run does not count twice.
    """
    if not rows:
        return
    q = t.quarantine
    ins = _insert(conn, q)
    stmt = ins.on_conflict_do_update(
        index_elements=[q.c.location, q.c.source_key],
        index_where=_OPEN,
        set_={
            "stage": ins.excluded.stage,
            "http_status": ins.excluded.http_status,
            "errors": ins.excluded.errors,
            "payload": ins.excluded.payload,
            "source_hash": ins.excluded.source_hash,
            "duplicate_of": ins.excluded.duplicate_of,
            "dag_id": ins.excluded.dag_id,
            "run_id": ins.excluded.run_id,
            "last_seen_at": ins.excluded.last_seen_at,
            "attempts": case((q.c.run_id == ins.excluded.run_id, q.c.attempts), else_=q.c.attempts + 1),
        },
    )
    conn.execute(
        stmt,
        [{**r, "first_seen_at": now, "last_seen_at": now, "attempts": 1, "status": "open"} for r in rows],
    )


def requarantine(
    conn: Connection, t: StateTables, location: str, keys: Sequence[str], *, run_id: str, now: datetime
) -> None:
    """Count another failing attempt of unchanged quarantined rows (once per run)."""
    q = t.quarantine
    for part in _chunks(keys):
        conn.execute(
            update(q)
            .where(
                q.c.location == location,
                q.c.status == "open",
                q.c.source_key.in_(list(part)),
                q.c.run_id != run_id,
            )
            .values(attempts=q.c.attempts + 1, last_seen_at=now, run_id=run_id)
        )


def resolve_quarantine(
    conn: Connection,
    t: StateTables,
    location: str,
    keys: Sequence[str],
    *,
    now: datetime,
    status: str = "resolved",
) -> int:
    """Close the open quarantine rows of keys that synced (or were found in step with the CRM)."""
    q = t.quarantine
    n = 0
    for part in _chunks(keys):
        res = conn.execute(
            update(q)
            .where(q.c.location == location, q.c.status == "open", q.c.source_key.in_(list(part)))
            .values(status=status, resolved_at=now)
        )
        n += res.rowcount or 0
    return n


def mark_pending(
    conn: Connection, t: StateTables, rows: Sequence[Mapping[str, Any]], *, now: datetime
) -> None:
    """Remember deferred rows (``location, source_key, reason, last_run_id``) for the next run."""
    if not rows:
        return
    p = t.pending
    ins = _insert(conn, p)
    stmt = ins.on_conflict_do_update(
        index_elements=[p.c.location, p.c.source_key],
        set_={
            "reason": ins.excluded.reason,
            "last_run_id": ins.excluded.last_run_id,
            "attempts": case(
                (p.c.last_run_id == ins.excluded.last_run_id, p.c.attempts), else_=p.c.attempts + 1
            ),
        },
    )
    conn.execute(stmt, [{**r, "since": now, "attempts": 1} for r in rows])


def clear_pending(conn: Connection, t: StateTables, location: str, keys: Sequence[str]) -> None:
    p = t.pending
    for part in _chunks(keys):
        conn.execute(p.delete().where(p.c.location == location, p.c.source_key.in_(list(part))))


def open_quarantine(
    conn: Connection,
    t: StateTables,
    location: str,
    *,
    stage: str | None = None,
    contains: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Open quarantine rows, oldest first; ``contains`` filters on the error text."""
    q = t.quarantine
    stmt = select(q).where(q.c.location == location, q.c.status == "open").order_by(q.c.first_seen_at, q.c.id)
    if stage:
        stmt = stmt.where(q.c.stage == stage)
    rows = [dict(r._mapping) for r in conn.execute(stmt)]
    if contains:
        needle = contains.lower()
        rows = [r for r in rows if needle in json.dumps(r["errors"]).lower()]
    return rows[:limit] if limit else rows


def write_run(conn: Connection, t: StateTables, row: Mapping[str, Any]) -> None:
    """Insert or replace the run row of (run_id, location): finalising twice keeps one row."""
    ins = _insert(conn, t.runs)
    cols = [
        c.name for c in t.runs.columns if c.name not in ("run_id", "location", "started_at") and c.name in row
    ]
    stmt = ins.on_conflict_do_update(
        index_elements=[t.runs.c.run_id, t.runs.c.location],
        set_={c: ins.excluded[c] for c in cols},
    )
    conn.execute(stmt, dict(row))


def get_run(conn: Connection, t: StateTables, run_id: str, location: str) -> dict[str, Any] | None:
    r = conn.execute(
        select(t.runs).where(and_(t.runs.c.run_id == run_id, t.runs.c.location == location))
    ).first()
    return dict(r._mapping) if r else None


def run_progress(conn: Connection, t: StateTables, run_id: str) -> dict[str, Any]:
    """What a run recorded before it failed (its counts are only added up by a finished run)."""

    def count(table: Table, *where: Any) -> int:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()

    open_rows = (t.quarantine.c.run_id == run_id, _OPEN)
    errors: Counter[str] = Counter()
    for (messages,) in conn.execute(select(t.quarantine.c.errors).where(*open_rows)):
        errors.update(str(m) for m in messages or [])
    return {
        "synced": count(t.ledger, t.ledger.c.last_run_id == run_id),
        "quarantined": count(t.quarantine, *open_rows),
        "deferred": count(t.pending, t.pending.c.last_run_id == run_id),
        "errors": dict(errors),
    }


def owners_of(
    conn: Connection, t: StateTables, location: str, identities: Iterable[str], *, lock: bool = True
) -> dict[str, str | None]:
    """Owner (source key) of each of ``identities``, ``None`` when free; with ``lock``, the rows
    stay locked until the transaction ends (PostgreSQL, in sorted order so two tasks never wait
    on each other crosswise; SQLite serialises writers anyway)."""
    names = sorted(set(identities))
    ids = t.identities
    owners: dict[str, str | None] = dict.fromkeys(names)
    for part in _chunks(names):
        query = (
            select(ids.c.identity, ids.c.source_key)
            .where(ids.c.location == location, ids.c.identity.in_(list(part)))
            .order_by(ids.c.identity)
        )
        owners.update((n, k) for n, k in conn.execute(query.with_for_update() if lock else query))
    return owners


def claim_free_identities(
    conn: Connection, t: StateTables, location: str, wanted: Mapping[str, str], *, run_id: str, now: datetime
) -> tuple[dict[str, str | None], set[str]]:
    """Owners of the ``wanted`` identities (identity → the key that wants it), locked until the
    transaction ends; free ones are claimed for the key that wants them on the way.

    Returns the owners and the identities claimed here (the caller frees those of a row that
    loses on another identity). One batched insert for the free ones, the common case of a
    first sync; a row claimed by another task between the lookup and the insert is looked up
    again, after waiting for that task's transaction.
    """
    owners = owners_of(conn, t, location, wanted)
    free = [n for n, k in owners.items() if k is None]
    if not free:
        return owners, set()
    ids = t.identities
    stmt = (
        _insert(conn, ids)
        .on_conflict_do_nothing(index_elements=[ids.c.location, ids.c.identity])
        .returning(ids.c.identity)
    )
    claimed: set[str] = set()
    for part in _chunks(free):
        rows = [
            {
                "location": location,
                "identity": n,
                "source_key": wanted[n],
                "claimed_at": now,
                "last_run_id": run_id,
            }
            for n in part
        ]
        claimed.update(conn.execute(stmt, rows).scalars())
    owners.update((n, wanted[n]) for n in claimed)
    if raced := [n for n in free if n not in claimed]:
        owners.update(owners_of(conn, t, location, raced))
    return owners, claimed


def claim_identities(
    conn: Connection, t: StateTables, location: str, owners: Mapping[str, str], *, run_id: str, now: datetime
) -> None:
    """Make ``owners`` (identity → source key) the owners of identities locked by :func:`owners_of`.

    An upsert rather than an UPDATE per identity: inserts are sent in batches.
    """
    if not owners:
        return
    ids = t.identities
    ins = _insert(conn, ids)
    stmt = ins.on_conflict_do_update(
        index_elements=[ids.c.location, ids.c.identity],
        set_={"source_key": ins.excluded.source_key, "claimed_at": now, "last_run_id": run_id},
    )
    rows = [{"location": location, "identity": n, "source_key": k} for n, k in sorted(owners.items())]
    for part in _chunks(rows):
        conn.execute(stmt, list(part))


def identities_owned(
    conn: Connection, t: StateTables, location: str, keys: Iterable[str]
) -> dict[str, set[str]]:
    """Identities owned by each of ``keys``."""
    ids = t.identities
    out: dict[str, set[str]] = {}
    for part in _chunks(sorted(set(keys))):
        rows = conn.execute(
            select(ids.c.source_key, ids.c.identity).where(
                ids.c.location == location, ids.c.source_key.in_(list(part))
            )
        )
        for key, name in rows:
            out.setdefault(key, set()).add(name)
    return out


def release_identities(conn: Connection, t: StateTables, location: str, identities: Iterable[str]) -> None:
    """Free identities: their rows go (they hold emails and phones), so do unclaimed placeholders."""
    ids = t.identities
    for part in _chunks(sorted(set(identities))):
        conn.execute(ids.delete().where(ids.c.location == location, ids.c.identity.in_(list(part))))


def release_owned(conn: Connection, t: StateTables, location: str, keys: Iterable[str]) -> None:
    """Free every identity the rows of ``keys`` own."""
    ids = t.identities
    for part in _chunks(sorted(set(keys))):
        conn.execute(ids.delete().where(ids.c.location == location, ids.c.source_key.in_(list(part))))


def duplicates_of(conn: Connection, t: StateTables, location: str, owners: Iterable[str]) -> list[str]:
    """Keys of open quarantine rows that lost an identity to one of ``owners``."""
    q = t.quarantine
    out: list[str] = []
    for part in _chunks(sorted(set(owners))):
        out.extend(
            conn.execute(
                select(q.c.source_key).where(
                    q.c.location == location, q.c.status == "open", q.c.duplicate_of.in_(list(part))
                )
            ).scalars()
        )
    return out


def synced_in_run(
    conn: Connection, t: StateTables, location: str, keys: Iterable[str], run_id: str
) -> set[str]:
    """Those of ``keys`` the ledger recorded in run ``run_id``."""
    led = t.ledger
    out: set[str] = set()
    for part in _chunks(sorted(set(keys))):
        stmt = select(led.c.source_key).where(
            led.c.location == location, led.c.source_key.in_(list(part)), led.c.last_run_id == run_id
        )
        out.update(conn.execute(stmt).scalars())
    return out


def drop_from_ledger(conn: Connection, t: StateTables, location: str, keys: Sequence[str]) -> None:
    """Forget that rows were synced: their contact now belongs to another row."""
    led = t.ledger
    for part in _chunks(keys):
        conn.execute(led.delete().where(led.c.location == location, led.c.source_key.in_(list(part))))


def invalidate_ledger(conn: Connection, t: StateTables, location: str, keys: Sequence[str]) -> None:
    """Make rows' next run send them again (the CRM may hold another row's values)."""
    led = t.ledger
    for part in _chunks(keys):
        conn.execute(
            update(led)
            .where(led.c.location == location, led.c.source_key.in_(list(part)))
            .values(payload_hash="", source_hash=None)
        )


def pending_keys(
    conn: Connection, t: StateTables, location: str, *, run_id: str, reasons: Sequence[str]
) -> list[str]:
    """Keys a run left pending for one of ``reasons``."""
    p = t.pending
    stmt = (
        select(p.c.source_key)
        .where(p.c.location == location, p.c.last_run_id == run_id, p.c.reason.in_(list(reasons)))
        .order_by(p.c.source_key)
    )
    return list(conn.execute(stmt).scalars())


def pending_reasons(
    conn: Connection, t: StateTables, location: str, keys: Iterable[str]
) -> dict[str, tuple[str, str | None]]:
    """``(reason, last_run_id)`` of the pending rows among ``keys``."""
    p = t.pending
    out: dict[str, tuple[str, str | None]] = {}
    for part in _chunks(sorted(set(keys))):
        rows = conn.execute(
            select(p.c.source_key, p.c.reason, p.c.last_run_id).where(
                p.c.location == location, p.c.source_key.in_(list(part))
            )
        )
        out.update((k, (reason, run_id)) for k, reason, run_id in rows)
    return out
