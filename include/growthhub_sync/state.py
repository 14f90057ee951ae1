"""Sync state kept next to the data: ledger, quarantine, pending rows and the run log.

SQLAlchemy Core only, one code path for PostgreSQL and SQLite; every write is an upsert
(``INSERT ... ON CONFLICT``) so a retried task or a re-run creates no duplicate row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
    bindparam,
    case,
    exc,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from growthhub_sync.keyed import rows_by_key
from growthhub_sync.migrations import quota_columns, upgrade_quarantine, upgrade_runs
from growthhub_sync.outcomes import RUN_COUNTS, VERIFY_COUNTS
from growthhub_sync.reasons import having_any, split_codes

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Executable, Select
    from sqlalchemy.engine import Connection, Engine

    from growthhub_sync.config import StateConfig
    from growthhub_sync.outcomes import QuarantineRow, SyncedRow

_OPEN = text("status = 'open'")  # a literal: ON CONFLICT must repeat the partial index's predicate verbatim
_CHUNK = 2000  # keys per IN (...) list: well under SQLite's variable limit
_QUARANTINE_UPDATED = (  # what a quarantine row's next failure overwrites (not first seen, attempts, status)
    "stage", "http_status", "errors", "reason_codes", "payload", "source_hash", "duplicate_of",
    "dag_id", "run_id", "last_seen_at",
)  # fmt: skip


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
        # stable codes of ``errors`` (email_invalid, no_identity, api_422, ...), comma-separated,
        # the most telling first: what summaries, alerts, filters and metrics count
        Column("reason_codes", String(255)),
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
    open_only: dict[str, Any] = {"postgresql_where": _OPEN, "sqlite_where": _OPEN}
    q = quarantine.c
    Index(f"{p}ix_growthhub_quarantine_open", q.location, q.source_key, unique=True, **open_only)
    # the GrowthHub page: open rows per location and stage, by id (keyset pages); the codes included
    # let PostgreSQL filter on them without reading the table
    codes = {"postgresql_include": ["reason_codes"]}
    Index(f"{p}ix_growthhub_quarantine_open_page", q.location, q.stage, q.id, **codes, **open_only)
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
        *(Column(n, Integer, nullable=False, default=0) for n in (*RUN_COUNTS, *VERIFY_COUNTS)),
        Column("warnings", Integer, nullable=False, default=0),
        Column("batches", Integer, nullable=False, default=0),
        Column("invariant_ok", Boolean),
        Column("status", String(16), nullable=False),
        Column("details", JSON),
        Column("started_at", ts),
        Column("finished_at", ts),
        *quota_columns(),
    )
    Index(f"{p}ix_growthhub_sync_runs_location", runs.c.location, runs.c.started_at)  # the page's runs
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


def ensure_state(engine: Engine, tables: StateTables) -> None:
    """Create the state tables, or bring older ones up to date; safe when parallel tasks race.

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
            upgrade_quarantine(engine, tables.quarantine)
            upgrade_runs(engine, tables.runs)
            for index in (*tables.quarantine.indexes, *tables.runs.indexes):  # tables older than the page's
                index.create(engine, checkfirst=True)
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
    r = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id, t.runs.c.location == location)).first()
    return dict(r._mapping) if r else None


def run_progress(conn: Connection, t: StateTables, run_id: str) -> dict[str, Any]:
    """What a run recorded before it failed (its counts are only added up by a finished run)."""

    def count(table: Table, *where: Any) -> int:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()

    open_rows = (t.quarantine.c.run_id == run_id, _OPEN)
    reasons: Counter[str] = Counter()
    codes = func.coalesce(t.quarantine.c.reason_codes, "")
    for value, n in conn.execute(select(codes, func.count()).where(*open_rows).group_by(codes)):
        reasons.update(dict.fromkeys(split_codes(value), n))
    return {
        "synced": count(t.ledger, t.ledger.c.last_run_id == run_id),
        "quarantined": count(t.quarantine, *open_rows),
        "deferred": count(t.pending, t.pending.c.last_run_id == run_id),
        "reasons": dict(reasons),
    }


@dataclass(frozen=True)
class StateStore:
    """One location's state rows, written inside one transaction (or read on one connection).

    The handle carries what every write of a chunk shares (connection, tables, location, run,
    time), so a transaction's writes read as one block. Keys are source keys (strings).
    """

    conn: Connection
    tables: StateTables
    location: str
    run_id: str = "manual"
    dag_id: str | None = None
    now: datetime = field(default_factory=utcnow)

    # -- ledger -----------------------------------------------------------------------------------
    def record_synced(self, rows: Sequence[SyncedRow]) -> None:
        """Record rows the CRM accepted (an upsert: a retried task keeps one ledger row each)."""
        if not rows:
            return
        led = self.tables.ledger
        ins = _insert(self.conn, led)
        stmt = ins.on_conflict_do_update(
            index_elements=[led.c.location, led.c.source_key],
            set_={
                "contact_id": ins.excluded.contact_id,
                "payload_hash": ins.excluded.payload_hash,
                "source_hash": ins.excluded.source_hash,
                "last_synced_at": ins.excluded.last_synced_at,
                "last_run_id": ins.excluded.last_run_id,
            },
        )
        base = {"location": self.location, "first_synced_at": self.now, "last_synced_at": self.now}
        self.conn.execute(
            stmt,
            [
                {
                    **base,
                    "source_key": r.source_key,
                    "contact_id": r.contact_id,
                    "payload_hash": r.payload_hash,
                    "source_hash": r.source_hash,
                    "last_run_id": self.run_id,
                }
                for r in rows
            ],
        )

    def refresh_source_hashes(self, hashes: Mapping[str, str]) -> None:
        """Store the source hash of rows found unchanged the slow way: next time the fast path sees them."""
        if not hashes:
            return
        led = self.tables.ledger
        stmt = (
            update(led)
            .where(led.c.location == self.location, led.c.source_key == bindparam("k"))
            .values(source_hash=bindparam("h"))
        )
        self.conn.execute(stmt, [{"k": k, "h": h} for k, h in hashes.items()])

    def forget_source_hashes(self, keys: Iterable[str]) -> None:
        """Force the full path for rows that failed, so a later revert to the synced values resolves them."""
        led = self.tables.ledger
        self._each_part(
            keys,
            lambda part: (
                update(led)
                .where(self._of(led), led.c.source_key.in_(part), led.c.source_hash.is_not(None))
                .values(source_hash=None)
            ),
        )

    def drop_from_ledger(self, keys: Iterable[str]) -> None:
        """Forget that rows were synced: their contact now belongs to another row."""
        led = self.tables.ledger
        self._each_part(keys, lambda part: led.delete().where(self._of(led), led.c.source_key.in_(part)))

    def invalidate_ledger(self, keys: Iterable[str]) -> None:
        """Make rows' next run send them again (the CRM may hold another row's values)."""
        led = self.tables.ledger
        self._each_part(
            keys,
            lambda part: (
                update(led)
                .where(self._of(led), led.c.source_key.in_(part))
                .values(payload_hash="", source_hash=None)
            ),
        )

    def synced_in_run(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` the ledger recorded in this store's run."""
        led = self.tables.ledger
        ran = led.c.last_run_id == self.run_id
        return set(self._select_parts(keys, lambda part: self._by_key(led.c.source_key, part, [], ran)))

    # -- quarantine -------------------------------------------------------------------------------
    def quarantine(self, rows: Sequence[QuarantineRow]) -> None:
        """Open or update one quarantine row per source key.

        ``attempts`` grows once per run: a retried task of the same run does not count twice.
        """
        if not rows:
            return
        q = self.tables.quarantine
        ins = _insert(self.conn, q)
        stmt = ins.on_conflict_do_update(
            index_elements=[q.c.location, q.c.source_key],
            index_where=_OPEN,
            set_={
                **{c: ins.excluded[c] for c in _QUARANTINE_UPDATED},
                "attempts": case((q.c.run_id == ins.excluded.run_id, q.c.attempts), else_=q.c.attempts + 1),
            },
        )
        common = {
            "location": self.location,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "first_seen_at": self.now,
            "last_seen_at": self.now,
            "attempts": 1,
            "status": "open",
        }
        self.conn.execute(stmt, [{**common, **r.columns()} for r in rows])

    def requarantine(self, keys: Iterable[str]) -> None:
        """Count another failing attempt of unchanged quarantined rows (once per run)."""
        q = self.tables.quarantine
        self._each_part(
            keys,
            lambda part: (
                update(q)
                .where(self._of(q), q.c.status == "open", q.c.source_key.in_(part), q.c.run_id != self.run_id)
                .values(attempts=q.c.attempts + 1, last_seen_at=self.now, run_id=self.run_id)
            ),
        )

    def resolve_quarantine(self, keys: Iterable[str], *, status: str = "resolved") -> int:
        """Close the open quarantine rows of keys that synced (or were found in step with the CRM)."""
        q = self.tables.quarantine
        return self._each_part(
            keys,
            lambda part: (
                update(q)
                .where(self._of(q), q.c.status == "open", q.c.source_key.in_(part))
                .values(status=status, resolved_at=self.now)
            ),
        )

    def open_quarantine(
        self,
        *,
        stage: str | None = None,
        codes: Sequence[str] = (),
        keys: Sequence[str] = (),
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Open quarantine rows, oldest first: of ``stage``, with any of the reason ``codes``, among
        the source ``keys`` (each filter only when given; ``keys`` a page of rows, not thousands)."""
        q = self.tables.quarantine
        stmt = select(q).where(self._of(q), q.c.status == "open").order_by(q.c.first_seen_at, q.c.id)
        if stage:
            stmt = stmt.where(q.c.stage == stage)
        if codes:
            stmt = stmt.where(having_any(q.c.reason_codes, codes))
        if keys:
            stmt = stmt.where(q.c.source_key.in_(list(keys)))
        if limit:
            stmt = stmt.limit(limit)
        return [dict(r._mapping) for r in self.conn.execute(stmt)]

    def duplicates_of(self, owners: Iterable[str]) -> list[str]:
        """Keys of open quarantine rows that lost an identity to one of ``owners``."""
        q = self.tables.quarantine
        return self._select_parts(
            owners,
            lambda part: select(q.c.source_key).where(
                self._of(q), q.c.status == "open", q.c.duplicate_of.in_(part)
            ),
        )

    # -- pending ----------------------------------------------------------------------------------
    def mark_pending(self, reasons: Mapping[str, str]) -> None:
        """Remember rows (source key → why) for the next run, or for this run's finalize."""
        if not reasons:
            return
        p = self.tables.pending
        ins = _insert(self.conn, p)
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
        common = {"location": self.location, "last_run_id": self.run_id, "since": self.now, "attempts": 1}
        self.conn.execute(
            stmt, [{**common, "source_key": k, "reason": reason[:1000]} for k, reason in reasons.items()]
        )

    def clear_pending(self, keys: Iterable[str]) -> None:
        p = self.tables.pending
        self._each_part(keys, lambda part: p.delete().where(self._of(p), p.c.source_key.in_(part)))

    def pending_keys(self, reasons: Sequence[str]) -> list[str]:
        """Keys this store's run left pending for one of ``reasons``."""
        p = self.tables.pending
        stmt = (
            select(p.c.source_key)
            .where(self._of(p), p.c.last_run_id == self.run_id, p.c.reason.in_(list(reasons)))
            .order_by(p.c.source_key)
        )
        return list(self.conn.execute(stmt).scalars())

    def pending_reasons(self, keys: Iterable[str]) -> dict[str, tuple[str, str | None]]:
        """``(reason, last_run_id)`` of the pending rows among ``keys``."""
        p = self.tables.pending
        out: dict[str, tuple[str, str | None]] = {}
        for part in _chunks(sorted(set(keys))):
            rows = self.conn.execute(self._by_key(p.c.source_key, part, [p.c.reason, p.c.last_run_id]))
            out.update((k, (reason, run_id)) for k, reason, run_id in rows)
        return out

    # -- identities -------------------------------------------------------------------------------
    def owners_of(self, identities: Iterable[str], *, lock: bool = True) -> dict[str, str | None]:
        """Owner (source key) of each of ``identities``, ``None`` when free; with ``lock``, the rows
        stay locked until the transaction ends (PostgreSQL, in sorted order so two tasks never wait
        on each other crosswise; SQLite serialises writers anyway)."""
        names = sorted(set(identities))
        ids = self.tables.identities
        owners: dict[str, str | None] = dict.fromkeys(names)
        for part in _chunks(names):
            query = self._by_key(ids.c.identity, part, [ids.c.source_key], lock=lock)
            owners.update((n, k) for n, k in self.conn.execute(query))
        return owners

    def claim_free_identities(self, wanted: Mapping[str, str]) -> tuple[dict[str, str | None], set[str]]:
        """Owners of the ``wanted`` identities (identity → the key that wants it), locked until the
        transaction ends; free ones are claimed for the key that wants them on the way.

        Returns the owners and the identities claimed here (the caller frees those of a row that
        loses on another identity). One batched insert for the free ones, the common case of a
        first sync; a row claimed by another task between the lookup and the insert is looked up
        again, after waiting for that task's transaction.
        """
        owners = self.owners_of(wanted)
        free = [n for n, k in owners.items() if k is None]
        if not free:
            return owners, set()
        ids = self.tables.identities
        stmt = (
            _insert(self.conn, ids)
            .on_conflict_do_nothing(index_elements=[ids.c.location, ids.c.identity])
            .returning(ids.c.identity)
        )
        claimed: set[str] = set()
        for part in _chunks(free):
            rows = [self._identity_row(n, wanted[n]) for n in part]
            claimed.update(self.conn.execute(stmt, rows).scalars())
        owners.update((n, wanted[n]) for n in claimed)
        if raced := [n for n in free if n not in claimed]:
            owners.update(self.owners_of(raced))
        return owners, claimed

    def claim_identities(self, owners: Mapping[str, str]) -> None:
        """Make ``owners`` (identity → source key) the owners of identities locked by :meth:`owners_of`.

        An upsert rather than an UPDATE per identity: inserts are sent in batches. Ownership moves
        in place, so a task waiting on the row lock then reads the new owner, where a delete and
        re-insert would show it a free identity.
        """
        if not owners:
            return
        ids = self.tables.identities
        ins = _insert(self.conn, ids)
        stmt = ins.on_conflict_do_update(
            index_elements=[ids.c.location, ids.c.identity],
            set_={"source_key": ins.excluded.source_key, "claimed_at": self.now, "last_run_id": self.run_id},
        )
        rows = [self._identity_row(n, k) for n, k in sorted(owners.items())]
        for part in _chunks(rows):
            self.conn.execute(stmt, list(part))

    def identities_owned(self, keys: Iterable[str]) -> dict[str, set[str]]:
        """Identities owned by each of ``keys``."""
        ids = self.tables.identities
        out: dict[str, set[str]] = {}
        for part in _chunks(sorted(set(keys))):
            rows = self.conn.execute(
                select(ids.c.source_key, ids.c.identity).where(
                    self._of(ids), ids.c.source_key.in_(list(part))
                )
            )
            for key, name in rows:
                out.setdefault(key, set()).add(name)
        return out

    def release_identities(self, identities: Iterable[str]) -> None:
        """Free identities: their rows go (they hold emails and phones), so do unclaimed placeholders."""
        ids = self.tables.identities
        self._each_part(identities, lambda part: ids.delete().where(self._of(ids), ids.c.identity.in_(part)))

    def release_owned(self, keys: Iterable[str]) -> None:
        """Free every identity the rows of ``keys`` own."""
        ids = self.tables.identities
        self._each_part(keys, lambda part: ids.delete().where(self._of(ids), ids.c.source_key.in_(part)))

    # -- helpers ----------------------------------------------------------------------------------
    def _of(self, table: Table) -> ColumnElement[bool]:
        return table.c.location == self.location

    def _by_key(
        self,
        key: Column[str],
        keys: Sequence[str],
        columns: Sequence[Column[Any]],
        *where: Any,
        lock: bool = False,
    ) -> Select[Any]:
        """``key`` and ``columns`` of this location's rows of ``keys`` by primary key (:mod:`.keyed`)."""
        of = self._of(key.table)  # type: ignore[arg-type]
        return rows_by_key(self.conn.dialect.name, key, keys, [key, *columns], [of, *where], lock=lock)

    def _identity_row(self, identity: str, key: str) -> dict[str, Any]:
        return {
            "location": self.location,
            "identity": identity,
            "source_key": key,
            "claimed_at": self.now,
            "last_run_id": self.run_id,
        }

    def _each_part(self, keys: Iterable[str], statement: Callable[[list[str]], Executable]) -> int:
        """Run ``statement`` for each slice of the sorted keys; returns the rows it touched."""
        touched = 0
        for part in _chunks(sorted(set(keys))):
            touched += self.conn.execute(statement(list(part))).rowcount or 0
        return touched

    def _select_parts(self, keys: Iterable[str], query: Callable[[list[str]], Select[Any]]) -> list[str]:
        out: list[str] = []
        for part in _chunks(sorted(set(keys))):
            out.extend(self.conn.execute(query(list(part))).scalars())
        return out
