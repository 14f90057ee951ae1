"""The batch pipeline: extract → map → check → diff → upsert → record, for one location.

Every extracted row ends in exactly one outcome: ``unchanged``, ``created``, ``updated``,
``quarantined`` (quality), ``rejected`` (API 400/422) or ``deferred`` (quota or transient
failure: kept pending and picked up first next time). The DAGs call
:func:`plan_sync` → :func:`sync_batch` (one per key range) → :func:`finalize_run`;
:func:`sync` does all three in one call; :func:`replay_quarantine` re-sends fixed rows.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sqlalchemy import create_engine

from growthhub_provider.masking import mask_pii
from growthhub_sync import state
from growthhub_sync.config import ConfigError, LocationConfig, SyncConfig, validate_source_columns
from growthhub_sync.diff import payload_hash, sorted_by_source, source_hashes
from growthhub_sync.extract import KeyRange, Narrow, Source, Window, plan_key_ranges, stream
from growthhub_sync.mapping import MappedBatch, Mapper

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.engine import Connection, Engine, Row

    from growthhub_sync.checks import QualityChecker

log = logging.getLogger(__name__)

_DUPLICATE = re.compile(r"^duplicate identity of (.+)$")
STILL_QUARANTINED = "unchanged in quarantine"
OVERWRITTEN = "contact overwritten by a row that lost its identity to this one: resend"
RESEND = "sent while a row that lost its identity to it was being sent: resend"
IDENTITY_FREED = "the row it lost its identity to gave it up: decide again"
LEFTOVERS = (OVERWRITTEN, RESEND, IDENTITY_FREED)
"""Pending reasons :func:`finalize_run` settles once every batch of the run is done."""
_SETTLE_ROUNDS = 10
OUTCOMES = ("unchanged", "created", "updated", "quarantined", "rejected", "deferred")


class SyncInvariantError(RuntimeError):
    """extracted != unchanged + created + updated + quarantined + rejected + deferred."""


class Upserter(Protocol):
    """What the pipeline needs from the GrowthHub hook (tests inject fakes)."""

    def upsert_contacts(
        self, rows: Iterable[tuple[str, dict[str, Any]]], *, daily_reserve: int = 0
    ) -> Iterator[Any]: ...


@dataclass(frozen=True)
class SyncOptions:
    """How to run. ``full_refresh`` ignores the window *and* the ledger: every row is checked and sent."""

    run_id: str = "manual"
    dag_id: str | None = None
    dry_run: bool = False
    full_refresh: bool = False
    daily_reserve: int = 0
    samples: int = 5
    """Masked sample payloads kept in a dry run's summary."""
    keep_results: bool = True
    """Store GX validation results (JSON) for Data Docs."""
    flush_every: int = 500
    """API outcomes recorded per transaction: bounds what a killed worker sends twice."""


def mask_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A payload fit for logs and XCom: email and phone masked."""
    out = dict(payload)
    if out.get("email"):
        out["email"] = mask_pii(str(out["email"]))
    if out.get("phone"):
        out["phone"] = mask_pii(str(out["phone"]))
    return out


@dataclass
class Summary:
    """Counts of one batch or run; small enough for XCom (:meth:`as_dict`)."""

    extracted: int = 0
    unchanged: int = 0
    created: int = 0
    updated: int = 0
    quarantined: int = 0
    rejected: int = 0
    deferred: int = 0
    warnings: int = 0
    checked: int = 0
    """Rows that went through the GX suite (the others were settled by their hashes)."""
    displaced: int = 0
    """Rows synced earlier (this run or before) whose email or phone a newer row took: now
    quarantined as its duplicates. Not an outcome of this run's rows: outside the invariant."""
    reasons: Counter[str] = field(default_factory=Counter)
    """Quarantine reasons (check names, ``duplicate``, ``api <status>``) → rows."""
    messages: Counter[str] = field(default_factory=Counter)
    """Most frequent API rejection messages → rows."""
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accounted(self) -> int:
        return sum(getattr(self, o) for o in OUTCOMES)

    @property
    def invariant_ok(self) -> bool:
        return self.extracted == self.accounted

    def add(self, other: Summary | Mapping[str, Any]) -> None:
        data = other.as_dict() if isinstance(other, Summary) else other
        for name in ("extracted", *OUTCOMES, "warnings", "checked", "displaced"):
            setattr(self, name, getattr(self, name) + int(data.get(name, 0)))
        self.reasons.update(data.get("reasons", {}))
        self.messages.update(data.get("messages", {}))
        self.samples.extend(data.get("samples", [])[: max(0, 5 - len(self.samples))])

    def as_dict(self) -> dict[str, Any]:
        return {
            "extracted": self.extracted,
            **{o: getattr(self, o) for o in OUTCOMES},
            "warnings": self.warnings,
            "checked": self.checked,
            "displaced": self.displaced,
            "reasons": dict(self.reasons.most_common()),
            "messages": dict(self.messages.most_common(10)),
            "samples": self.samples,
        }


@lru_cache(maxsize=8)
def _engine_for(url: str) -> Engine:
    # hide_parameters: a failing statement must not print contacts' emails and phones into the log
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # mapped tasks on one SQLite file wait for the lock
    return create_engine(url, **kwargs)


def warehouse_url(conn_id: str) -> str:
    """SQLAlchemy URL of an Airflow connection (only this function needs Airflow).

    An explicit ``sqlalchemy_url`` extra wins; ``sqlite`` connections name the file in
    ``host``; otherwise the connection's hook decides (``PostgresHook.sqlalchemy_url``).
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    if url := conn.extra_dejson.get("sqlalchemy_url"):
        return str(url)
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}"
    try:
        url = conn.get_hook().sqlalchemy_url
        return url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else str(url)
    except Exception:  # hooks without a sqlalchemy_url: fall back to the connection URI
        return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", conn.get_uri())


def get_engine(config: SyncConfig, engine: Engine | None = None) -> Engine:
    """The given engine, else ``source.url``, else the Airflow connection ``source.conn_id``."""
    if engine is not None:
        return engine
    return _engine_for(config.source.url or warehouse_url(config.source.conn_id))


def _default_upserter(location: LocationConfig) -> Upserter:
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    return GrowthHubHook(growthhub_conn_id=location.conn_id)


def _gx_run_name(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "__".join(str(p) for p in parts))[:200]


class _BatchRunner:
    """Runs chunks of one location through every stage and records the outcomes."""

    def __init__(
        self,
        config: SyncConfig,
        location: LocationConfig,
        engine: Engine,
        options: SyncOptions,
        upserter: Upserter | Callable[[LocationConfig], Upserter] | None,
    ) -> None:
        self.config, self.location, self.engine, self.options = config, location, engine, options
        self.tables = state.state_tables(config.state)
        self.source = Source(config, location, self.tables, engine.dialect.name)
        self.mapper = Mapper(config, self.source.columns)
        self.key_i = self.source.columns.index(config.source.key_column)
        self.upd_i = self.source.columns.index(config.source.updated_at_column)
        self.salt = f"{config.fingerprint}:{location.location_id}:"
        self._upserter = upserter
        self._checker: QualityChecker | None = None
        self.summary = Summary()
        self._chunk_no = 0
        self._hash_of: dict[str, str] = {}
        self._owned: dict[str, list[str]] = {}
        """Identities each row of the current chunk owns (to check them again after sending)."""
        self._outcome_of: dict[str, str] = {}
        self.recheck = False
        """Check and send quarantined rows even when unchanged (the replay)."""
        self.settling = False
        """Sending a run's leftovers after its batches: no other task of the run is sending."""

    # -- collaborators, created on first use (a chunk of unchanged rows needs neither) -----
    def checker(self, columns: Sequence[str]) -> QualityChecker:
        if self._checker is None:
            self._checker = _checker_for(self.config, tuple(columns), self.options.keep_results)
        return self._checker

    def upserter(self) -> Upserter:
        if self._upserter is None:
            self._upserter = _default_upserter(self.location)
        elif not hasattr(self._upserter, "upsert_contacts"):
            self._upserter = self._upserter(self.location)  # a factory
        return self._upserter  # type: ignore[return-value]

    # -- the stages ---------------------------------------------------------------------
    def run_range(self, window: Window, key_range: KeyRange) -> Summary:
        size = self.config.batch_size
        done: set[str] = set()
        with self.engine.connect() as conn:
            # pending rows first: they waited longest. The window query leaves pending rows out,
            # but it starts after the pending pass cleared theirs: skip the ones already done
            for chunk in stream(conn, self.source.selection(window, key_range, pending=True), size):
                done.update(str(r[Narrow.KEY]) for r in chunk)
                self.process(chunk, from_pending=True)
            for chunk in stream(conn, self.source.selection(window, key_range, pending=False), size):
                rows = [r for r in chunk if str(r[Narrow.KEY]) not in done] if done else chunk
                if rows:
                    self.process(rows, from_pending=False)
        return self.summary

    def process(
        self,
        rows: Sequence[Row[Any]] | Sequence[Sequence[Any]],
        *,
        from_pending: bool,
        context: Sequence[Sequence[Any]] = (),
    ) -> None:
        """One chunk through every stage; leaves one outcome per row in :attr:`summary`.

        ``rows`` are narrow rows (:attr:`Source.narrow_columns`): key, updated-at, email, phone,
        the row's digest and its ledger / quarantine hashes. Full rows are read only for the
        rows that changed. ``context`` rows only take part in the duplicate check.
        """
        o, s, loc = self.options, Summary(extracted=len(rows)), self.location.name
        self._chunk_no += 1
        keys = [str(r[Narrow.KEY]) for r in rows]
        src_hashes = source_hashes([r[Narrow.DIGEST] for r in rows], self.salt)
        # one pass over the narrow rows, no per-chunk dicts: most rows of a touched table are
        # settled here (source hash in the ledger) or still quarantined (source hash held)
        settled, todo, still_bad, dups = sorted_by_source(
            rows, src_hashes, use_ledger=not o.full_refresh, use_held=not self.recheck
        )
        if dups:
            # an unchanged duplicate stays quarantined while the row it lost to still owns one of
            # its identities (an owner's rank only grows); otherwise it is decided again
            contacts = [(rows[i][Narrow.EMAIL], rows[i][Narrow.PHONE]) for i in dups]
            found = [_names(ids) for ids in self.mapper.identities(contacts)]
            with self.engine.connect() as conn:
                owners = state.owners_of(conn, self.tables, loc, set().union(*found), lock=False)
            for i, ids in zip(dups, found, strict=True):
                winner = str(rows[i][Narrow.HELD_DUPLICATE_OF])
                (still_bad if any(owners[n] == winner for n in ids) else todo).append(i)
            todo.sort()
        # the ledger and the source hashes by key serve only the rows that take the full path
        ledger = (
            {}
            if o.full_refresh or not todo
            else {
                k: (r[Narrow.LEDGER_SOURCE], r[Narrow.LEDGER_PAYLOAD])
                for k, r in zip(keys, rows, strict=True)
                if r[Narrow.LEDGER_PAYLOAD] is not None
            }
        )
        self._hash_of = {keys[i]: src_hashes[i] for i in todo}
        self._owned = {}
        still_bad_keys = [keys[i] for i in still_bad]
        s.unchanged = len(settled)
        s.quarantined = len(still_bad)
        if still_bad:
            s.reasons[STILL_QUARANTINED] += len(still_bad)
        done_keys = [keys[i] for i in settled] + still_bad_keys if from_pending else []
        full = self._full_rows([keys[i] for i in todo]) if todo else {}
        vanished = [keys[i] for i in todo if keys[i] not in full]  # deleted or re-routed meanwhile
        todo = [i for i in todo if keys[i] in full]
        s.deferred = len(vanished)

        quarantine: list[dict[str, Any]] = []
        batch: MappedBatch | None = None
        passing: list[int] = []
        ids_of: dict[int, list[str]] = {}
        if todo:
            batch = self.mapper.map([full[keys[i]] for i in todo], self.location.location_id)
            result = self.checker(list(batch.frame.columns)).validate(
                batch.frame, batch.reasons, _gx_run_name(o.run_id, loc, self._chunk_no, keys[todo[0]])
            )
            s.checked = len(todo)
            errors = set(self.config.quality.errors) | {"identity"}
            for j in range(len(todo)):
                failed = result.failures.get(j, {})
                bad = {c: r for c, r in failed.items() if c in errors}
                if bad:
                    quarantine.append(
                        self._q(
                            batch.keys[j],
                            "quality",
                            None,
                            list(bad.values()),
                            batch.payloads[j],
                            src_hashes[todo[j]],
                        )
                    )
                    s.reasons.update(bad.keys())
                    continue
                for check in failed:  # a warning: send the row without the bad field
                    for f in batch.fields_of_check.get(check, []):
                        batch.payloads[j].pop(f, None)
                s.warnings += bool(failed)
                passing.append(j)
            found = self.mapper.identities([self.mapper.contact(batch.rows[j]) for j in passing])
            ids_of = {j: sorted(_names(ids)) for j, ids in zip(passing, found, strict=True)}
        rivals = [rows[i] for i in settled] + list(context)

        if o.dry_run:
            if batch is not None:
                with self.engine.connect() as conn:
                    passing, _ = self._claim(
                        conn, batch, passing, ids_of, rivals, ledger, quarantine, s, write=False
                    )
            sends, _, _ = self._sends(batch, passing, ledger, [src_hashes[i] for i in todo], s)
            s.quarantined += len(quarantine)
            for k, p in sends:
                s.updated += k in ledger
                s.created += k not in ledger
                if len(s.samples) < o.samples:
                    s.samples.append({"key": k, "payload": mask_payload(p)})
            self._finish(s)
            return

        now = state.utcnow()
        with self.engine.begin() as conn:
            if batch is not None:
                passing, again = self._claim(
                    conn, batch, passing, ids_of, rivals, ledger, quarantine, s, write=True
                )
            sends, send_meta, refresh = self._sends(batch, passing, ledger, [src_hashes[i] for i in todo], s)
            s.quarantined += len(quarantine)
            gone = "changed or gone during the run"
            state.mark_pending(
                conn,
                self.tables,
                self._pending_rows(vanished, gone),
                now=now,
            )
            state.quarantine_rows(conn, self.tables, quarantine, now=now)
            state.requarantine(conn, self.tables, loc, still_bad_keys, run_id=o.run_id, now=now)
            state.forget_source_hashes(conn, self.tables, loc, [q["source_key"] for q in quarantine])
            state.refresh_source_hashes(conn, self.tables, loc, refresh)
            closed = done_keys + [q["source_key"] for q in quarantine] + list(refresh)
            state.resolve_quarantine(conn, self.tables, loc, list(refresh), now=now)
            if from_pending:
                state.clear_pending(conn, self.tables, loc, closed)
            if batch is not None:
                state.mark_pending(conn, self.tables, self._pending_rows(again, IDENTITY_FREED), now=now)
        if sends:
            self._send(sends, send_meta, s)
        self._finish(s)

    def _full_rows(self, keys: Sequence[str]) -> dict[str, Sequence[Any]]:
        """The full source rows of ``keys`` (the changed ones of a chunk), by key."""
        out: dict[str, Sequence[Any]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 5000):
                stmt = self.source.by_keys(keys[i : i + 5000], full=True)
                out.update((str(r[self.key_i]), r) for r in conn.execute(stmt))
        return out

    def _identities_of_rivals(
        self, ids: Sequence[Sequence[str]], rivals: Sequence[tuple[Sequence[Any], bool]]
    ) -> list[tuple[tuple[str, bool, str], set[str]]]:
        """Rank and identities of the rivals that can share an identity with ``ids``.

        Normalising every unchanged row of a chunk would cost more than the whole diff, so only
        rows whose cheap key (:meth:`Mapper.cheap_ids`) hits are normalised.
        """
        hot = {x for row_ids in ids for x in row_ids}
        if not hot:
            return []
        pairs = [tuple(x.split(":", 1)) for x in hot]
        cheap_hot = {("email", v) for k, v in pairs if k == "email"} | {
            ("phone", v[-4:]) for k, v in pairs if k == "phone"
        }
        cheap_ids = self.mapper.cheap_ids
        email, phone = Narrow.EMAIL, Narrow.PHONE
        picked = []
        for row, in_ledger in rivals:
            cheap = cheap_ids(row[email], row[phone])
            if cheap is None or not cheap.isdisjoint(cheap_hot):
                picked.append((row, in_ledger))
        found = self.mapper.identities([(r[email], r[phone]) for r, _ in picked])
        named = [_names(i) for i in found]
        return [(_rank(r, led), i) for (r, led), i in zip(picked, named, strict=True) if i & hot]

    def _dedupe(
        self,
        batch: MappedBatch,
        passing: list[int],
        ids: Sequence[Sequence[str]],
        quarantine: list[dict[str, Any]],
        s: Summary,
        ledger: Mapping[str, Any],
        settled: Sequence[Sequence[Any]],
    ) -> list[int]:
        """Same email or phone twice: the best-ranked row wins (:func:`_rank`), the rest of the
        chunk's rows are quarantined as duplicates. ``ids`` are the identities of ``passing``.

        ``settled`` rows (unchanged rows of the chunk, the winners a replayed duplicate lost to,
        the owners of the chunk's identities) compete but are never quarantined here, so a rerun
        decides as the first run did.
        """
        contenders = [
            ((str(batch.updated_at[j]), batch.keys[j] in ledger, batch.keys[j]), ids[n], j)
            for n, j in enumerate(passing)
        ]
        contenders += [
            (rank, i, -1) for rank, i in self._identities_of_rivals(ids, [(r, True) for r in settled])
        ]
        owner: dict[str, str] = {}
        keep: list[int] = []
        for rank, mine, j in sorted(contenders, key=lambda c: c[0], reverse=True):
            key = rank[2]
            winner = next((owner[x] for x in mine if x in owner and owner[x] != key), None)
            if winner is not None and j >= 0:
                quarantine.append(self._duplicate(key, winner, batch.payloads[j], self._hash_of[key]))
                s.reasons["duplicate"] += 1
                continue
            if winner is None:
                owner.update(dict.fromkeys(mine, key))
            if j >= 0:
                keep.append(j)
        return sorted(keep)

    def _claim(
        self,
        conn: Connection,
        batch: MappedBatch,
        passing: list[int],
        ids_of: Mapping[int, list[str]],
        rivals: Sequence[Sequence[Any]],
        ledger: Mapping[str, Any],
        quarantine: list[dict[str, Any]],
        s: Summary,
        *,
        write: bool,
    ) -> tuple[list[int], list[str]]:
        """Same email or phone in another chunk, mapped task or run: one owner per identity.

        The API would merge such rows into one contact holding whichever came last. A row is
        sent only if it owns each of its identities: free ones, its own, ones whose owner's
        source row no longer has them, and ones whose owner it outranks (:func:`_rank`, on the
        owner's current row). An outranked owner is *displaced*: dropped from the ledger and
        quarantined as a duplicate of the new owner, whose values its contact gets. A row an
        owner outranks is quarantined as that owner's duplicate. ``write=False`` (a dry run)
        decides without recording anything. Returns the rows kept and the rows to decide again.
        """
        loc, o = self.location.name, self.options
        now = state.utcnow()
        wanted = {n: batch.keys[j] for j in passing for n in ids_of[j]}
        if write:
            owners, fresh = state.claim_free_identities(
                conn, self.tables, loc, wanted, run_id=o.run_id, now=now
            )
        else:
            owners, fresh = state.owners_of(conn, self.tables, loc, wanted, lock=False), set()
        # identities claimed just now belong to whoever wins them below; the owners from before
        # that are not in this chunk compete in the chunk's ranking, so a chain of duplicates is
        # settled in one pass (never quarantined there: they can only be displaced)
        before = {n: k for n, k in owners.items() if k is not None and n not in fresh}
        chunk = {batch.keys[j] for j in passing}
        owner_rows = self._source_rows(conn, set(before.values()))
        outside = [r for r in owner_rows if str(r[Narrow.KEY]) not in chunk]
        passing = self._dedupe(
            batch, passing, [ids_of[j] for j in passing], quarantine, s, ledger, [*rivals, *outside]
        )
        here = {batch.keys[j]: j for j in passing}
        current = self._holders([r for r in owner_rows if str(r[Narrow.KEY]) not in here])
        current.update(
            (k, _Holder((str(batch.updated_at[j]), k in ledger, k), set(ids_of[j]), self._hash_of[k]))
            for k, j in here.items()
        )
        queued = {q["source_key"] for q in quarantine}
        claims: dict[str, str] = {}
        displaced: dict[str, str] = {}
        keep: list[int] = []
        # best first, so an owner a better row displaces no longer beats the rows below it
        for j in sorted(passing, key=lambda j: current[batch.keys[j]].rank, reverse=True):
            key = batch.keys[j]
            others = {
                owner
                for n in ids_of[j]
                if (owner := before.get(n)) not in (None, key, *displaced)
                and owner in current
                and n in current[owner].ids
            }
            winner = max(others, key=lambda r: current[r].rank, default=None)
            if winner is not None and current[winner].rank > current[key].rank:
                quarantine.append(self._duplicate(key, winner, batch.payloads[j], self._hash_of[key]))
                queued.add(key)
                s.reasons["duplicate"] += 1
                continue
            keep.append(j)
            self._owned[key] = ids_of[j]
            claims.update((n, key) for n in ids_of[j] if owners[n] != key)
            displaced.update(dict.fromkeys(others, key))
        keep.sort()
        unclaim = fresh - {n for j in keep for n in ids_of[j]}
        # rows this chunk quarantined as duplicates of a row that has just lost or been displaced
        # too: the identity they share may be theirs after all; decided again when the run finalises
        beaten = {batch.keys[j] for j in passing} - {batch.keys[j] for j in keep} | set(displaced)
        again = [q["source_key"] for q in quarantine if q["duplicate_of"] in beaten]
        if not write:
            return keep, again
        state.release_identities(conn, self.tables, loc, unclaim)  # claimed above by rows that lost
        if displaced:
            # not an outcome of this chunk's rows (a displaced row was counted when it synced)
            moved = [
                self._duplicate(old, new, None, current[old].source_hash)
                for old, new in displaced.items()
                if old not in queued
            ]
            log.info("%d synced rows displaced by newer rows sharing their email or phone", len(moved))
            s.displaced += len(moved)
            state.quarantine_rows(conn, self.tables, moved, now=now)
            # an owner this run has not recorded may still be in flight (another task, or a
            # killed one, whose write may land after this row's): send this row again at the end
            recorded = state.synced_in_run(conn, self.tables, loc, displaced, o.run_id)
            racers = sorted({new for old, new in displaced.items() if old not in recorded})
            state.mark_pending(conn, self.tables, self._pending_rows(racers, OVERWRITTEN), now=now)
            state.drop_from_ledger(conn, self.tables, loc, sorted(displaced))
        # identities a row no longer has, and everything a displaced row owned, become free
        kept = {batch.keys[j]: set(ids_of[j]) for j in keep}
        owned = state.identities_owned(conn, self.tables, loc, kept)
        # ownership moves in place (an UPDATE): a task waiting on the row lock then reads the
        # new owner, where a delete and re-insert would show it a free identity
        state.claim_identities(conn, self.tables, loc, claims, run_id=o.run_id, now=now)
        stale = {n for k, ns in owned.items() for n in ns - kept[k]} - set(claims)
        state.release_identities(conn, self.tables, loc, stale)
        state.release_owned(conn, self.tables, loc, displaced)
        gave_up = {k for k, ns in owned.items() if ns - kept[k]} | set(displaced)
        self._redecide(conn, gave_up, queued | set(displaced), now)
        return keep, again

    def _source_rows(self, conn: Connection, keys: Iterable[str]) -> list[Row[Any]]:
        """The current narrow source rows of ``keys`` (rows gone from the source are left out)."""
        wanted = sorted(keys)
        rows: list[Row[Any]] = []
        for i in range(0, len(wanted), 2000):
            rows.extend(conn.execute(self.source.by_keys(wanted[i : i + 2000])))
        return rows

    def _holders(self, rows: Sequence[Row[Any]]) -> dict[str, _Holder]:
        """Rank, identities and source hash of narrow source rows, by key."""
        found = self.mapper.identities([(r[Narrow.EMAIL], r[Narrow.PHONE]) for r in rows])
        hashes = source_hashes([r[Narrow.DIGEST] for r in rows], self.salt)
        return {
            str(r[Narrow.KEY]): _Holder(_rank(r, r[Narrow.LEDGER_PAYLOAD] is not None), _names(i), h)
            for r, i, h in zip(rows, found, hashes, strict=True)
        }

    def _redecide(self, conn: Connection, owners: Iterable[str], skip: set[str], now: datetime) -> None:
        """Rows quarantined as duplicates of ``owners`` (which gave identities up): pending again."""
        retry = [
            k for k in state.duplicates_of(conn, self.tables, self.location.name, owners) if k not in skip
        ]
        state.mark_pending(conn, self.tables, self._pending_rows(retry, IDENTITY_FREED), now=now)

    def _sends(
        self,
        batch: MappedBatch | None,
        passing: Sequence[int],
        ledger: Mapping[str, Any],
        todo_hashes: Sequence[str],
        s: Summary,
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, tuple[str, str]], dict[str, str]]:
        """Rows to send (with their payload and source hashes) and rows the ledger already holds."""
        sends: list[tuple[str, dict[str, Any]]] = []
        meta: dict[str, tuple[str, str]] = {}
        refresh: dict[str, str] = {}
        for j in passing if batch is not None else ():
            k, p = batch.keys[j], batch.payloads[j]
            h = payload_hash(p)
            entry = ledger.get(k)
            if entry is not None and entry[1] == h and not self.options.full_refresh:
                s.unchanged += 1
                refresh[k] = todo_hashes[j]
            else:
                sends.append((k, p))
                meta[k] = (h, todo_hashes[j])
        return sends, meta, refresh

    def _send(
        self,
        sends: list[tuple[str, dict[str, Any]]],
        meta: dict[str, tuple[str, str]],
        s: Summary,
    ) -> None:
        loc, o = self.location.name, self.options
        seen: set[str] = set()
        synced: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        deferred: list[dict[str, Any]] = []
        payloads = dict(sends)
        self._outcome_of: dict[str, str] = {}

        def flush() -> None:
            if not (synced or rejected or deferred):
                return
            now = state.utcnow()
            with self.engine.begin() as conn:
                lost, freed = self._lost_while_sending(conn, synced, payloads, meta, s, now)
                kept = [r for r in synced if r["source_key"] not in lost and r["source_key"] not in freed]
                state.upsert_ledger(conn, self.tables, [{**r, "last_synced_at": now} for r in kept])
                done = [r["source_key"] for r in kept]
                # a row that lost its identity to this one may have been written after it: send
                # this one again once the batches are done (no other task can race it then)
                stale = (
                    []
                    if self.settling
                    else [
                        k
                        for k, (reason, run_id) in state.pending_reasons(conn, self.tables, loc, done).items()
                        if reason == OVERWRITTEN and run_id == o.run_id
                    ]
                )
                state.invalidate_ledger(conn, self.tables, loc, stale)
                state.mark_pending(conn, self.tables, self._pending_rows(stale, RESEND), now=now)
                state.resolve_quarantine(conn, self.tables, loc, done, now=now)
                state.quarantine_rows(conn, self.tables, rejected, now=now)
                refused = [r["source_key"] for r in rejected]
                state.forget_source_hashes(conn, self.tables, loc, refused)
                # a row the API refused owns nothing: rows it beat to an identity are decided again
                state.release_owned(conn, self.tables, loc, refused)
                self._redecide(conn, refused, set(), now)
                state.mark_pending(conn, self.tables, deferred, now=now)
                resent = set(stale)
                state.clear_pending(
                    conn,
                    self.tables,
                    loc,
                    [k for k in done if k not in resent] + refused + list(lost),
                )
            synced.clear()
            rejected.clear()
            deferred.clear()

        try:
            for out in self.upserter().upsert_contacts(sends, daily_reserve=o.daily_reserve):
                key = str(out.key)
                if key in seen or key not in payloads:
                    continue
                seen.add(key)
                if out.status in ("created", "updated"):
                    setattr(s, out.status, getattr(s, out.status) + 1)
                    h, src = meta[key]
                    synced.append(
                        {
                            "location": loc,
                            "source_key": key,
                            "contact_id": out.contact_id,
                            "payload_hash": h,
                            "source_hash": src,
                            "last_run_id": o.run_id,
                        }
                    )
                    self._outcome_of[key] = out.status
                elif out.status == "rejected":
                    s.rejected += 1
                    s.reasons[f"api {out.http_status}"] += 1
                    s.messages.update(mask_pii(str(m)) for m in (out.messages or []))
                    rejected.append(
                        self._q(
                            key, "api", out.http_status, list(out.messages or []), payloads[key], meta[key][1]
                        )
                    )
                else:  # failed (transient, after retries) or skipped (daily quota reserve reached)
                    s.deferred += 1
                    reason = f"{out.status}: {'; '.join(str(m) for m in out.messages or []) or out.status}"
                    deferred.append(
                        {"location": loc, "source_key": key, "reason": reason[:1000], "last_run_id": o.run_id}
                    )
                if len(synced) + len(rejected) + len(deferred) >= o.flush_every:
                    flush()
        finally:
            flush()  # record what was sent even when an auth error ends the task
        missing = [k for k, _ in sends if k not in seen]
        if missing:  # the hook owes one outcome per row; never lose a row if it does not deliver
            log.warning("%d rows without an upsert outcome: deferred", len(missing))
            s.deferred += len(missing)
            with self.engine.begin() as conn:
                state.mark_pending(
                    conn,
                    self.tables,
                    self._pending_rows(missing, "no outcome"),
                    now=state.utcnow(),
                )

    def _lost_while_sending(
        self,
        conn: Connection,
        synced: Sequence[Mapping[str, Any]],
        payloads: Mapping[str, dict[str, Any]],
        meta: Mapping[str, tuple[str, str]],
        s: Summary,
        now: datetime,
    ) -> tuple[dict[str, str], list[str]]:
        """Sent rows that no longer own what they claimed: another mapped task took it meanwhile.

        Returns the rows a newer row beat (→ that owner) and the rows whose identity was freed
        (their owner gave it up): neither is recorded as synced. Whose write reached the CRM
        last is unknown, so a beaten row is quarantined as the owner's duplicate and the owner is
        made to send again (:data:`OVERWRITTEN`: pending, its ledger entry no longer matching);
        a row whose identity was freed is decided again when the run finalises
        (:data:`IDENTITY_FREED`). Counted as quarantined or deferred instead of created/updated.
        """
        loc = self.location.name
        names = {r["source_key"]: self._owned.get(r["source_key"], []) for r in synced}
        owners = state.owners_of(conn, self.tables, loc, (n for ns in names.values() for n in ns))
        lost = {k: owner for k, ns in names.items() for n in ns if (owner := owners.get(n)) not in (None, k)}
        freed = [k for k, ns in names.items() if k not in lost and any(owners.get(n) is None for n in ns)]
        if not (lost or freed):
            return {}, []
        log.warning("%d sent rows lost their email or phone to another row meanwhile", len(lost) + len(freed))
        for key in [*lost, *freed]:
            status = self._outcome_of.pop(key)
            setattr(s, status, getattr(s, status) - 1)
        s.quarantined += len(lost)
        s.reasons["duplicate"] += len(lost)
        s.deferred += len(freed)
        state.quarantine_rows(
            conn,
            self.tables,
            [self._duplicate(k, w, payloads[k], meta[k][1]) for k, w in lost.items()],
            now=now,
        )
        winners = sorted(set(lost.values()))
        state.invalidate_ledger(conn, self.tables, loc, winners)
        state.mark_pending(
            conn,
            self.tables,
            self._pending_rows(winners, OVERWRITTEN) + self._pending_rows(freed, IDENTITY_FREED),
            now=now,
        )
        return lost, freed

    def _pending_rows(self, keys: Iterable[str], reason: str) -> list[dict[str, Any]]:
        return [
            {
                "location": self.location.name,
                "source_key": k,
                "reason": reason,
                "last_run_id": self.options.run_id,
            }
            for k in keys
        ]

    def _duplicate(
        self, key: str, winner: str, payload: dict[str, Any] | None, source_hash: str | None
    ) -> dict[str, Any]:
        """A quarantine row for a row that lost its email or phone to ``winner``."""
        return self._q(
            key,
            "quality",
            None,
            [f"duplicate identity of {winner}"],
            payload,
            source_hash,
            duplicate_of=winner,
        )

    def _q(
        self,
        key: str,
        stage: str,
        status: int | None,
        errors: list[str],
        payload: dict[str, Any] | None,
        source_hash: str | None = None,
        duplicate_of: str | None = None,
    ) -> dict[str, Any]:
        return {
            "source_hash": source_hash,
            "duplicate_of": duplicate_of,
            "location": self.location.name,
            "source_key": key,
            "stage": stage,
            "http_status": status,
            "errors": errors,
            "payload": payload,
            "dag_id": self.options.dag_id,
            "run_id": self.options.run_id,
        }

    def _finish(self, s: Summary) -> None:
        if not s.invariant_ok:
            raise SyncInvariantError(
                f"chunk accounted for {s.accounted} of {s.extracted} rows: {s.as_dict()}"
            )
        self.summary.add(s)


class _Holder(NamedTuple):
    """A source row competing for identities: its :func:`_rank`, identities and source hash."""

    rank: tuple[str, bool, str]
    ids: set[str]
    source_hash: str


def _names(identities: Iterable[tuple[str, str]]) -> set[str]:
    """``("email", "a@b.c")`` → ``"email:a@b.c"``: the key of the identities table."""
    return {f"{kind}:{value}" for kind, value in identities}


def _rank(row: Sequence[Any], in_ledger: bool) -> tuple[str, bool, str]:
    """Who wins a shared identity: latest ``updated_at``, then the row in the ledger, then the key."""
    return (str(row[Narrow.UPDATED_AT]), in_ledger, str(row[Narrow.KEY]))


_CHECKERS: dict[tuple[str, tuple[str, ...], bool], QualityChecker] = {}


def _checker_for(config: SyncConfig, columns: tuple[str, ...], keep_results: bool) -> QualityChecker:
    """One GX context per process and config: building it costs as much as validating ~50k rows."""
    from growthhub_sync.checks import QualityChecker

    key = (config.model_dump_json(), columns, keep_results)
    if key not in _CHECKERS:
        _CHECKERS[key] = QualityChecker(config, columns, keep_results=keep_results)
    return _CHECKERS[key]


def _prepare(config: SyncConfig, engine: Engine) -> state.StateTables:
    validate_source_columns(config, engine)
    tables = state.state_tables(config.state)
    state.ensure_state(engine, tables)
    return tables


def _window(window: Window | Mapping[str, Any] | None, full_refresh: bool) -> Window:
    if full_refresh or window is None:
        return Window()
    return window if isinstance(window, Window) else Window.from_dict(window)


def _require_connection(location: LocationConfig) -> None:
    """
    Fail the plan, naming the key, when the location's Airflow connection is not defined or its
    settings (TLS, coordination) are wrong: before any batch starts, not in every one of them.
    """
    from airflow.sdk import BaseHook

    from growthhub_provider.client import GrowthHubConfigError
    from growthhub_provider.hooks.growthhub import GrowthHubHook

    try:
        BaseHook.get_connection(location.conn_id)
    except Exception as exc:
        raise ConfigError(
            f"locations[{location.name}].conn_id: Airflow connection {location.conn_id!r} is not defined "
            f"({type(exc).__name__})"
        ) from None
    try:
        GrowthHubHook(growthhub_conn_id=location.conn_id).coordination  # noqa: B018 - resolves it
    except GrowthHubConfigError as exc:
        raise ConfigError(f"locations[{location.name}].conn_id: {exc}") from None


def plan_sync(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None,
    *,
    engine: Engine | None = None,
    batch_rows: int = 50_000,
    options: SyncOptions | None = None,
    check_connection: bool = True,
) -> dict[str, Any]:
    """Count the run's rows (window + pending) and cut them into key ranges for mapped tasks.

    Validates the config against the table, checks that the location's GrowthHub connection
    exists (unless ``check_connection`` is off: a caller bringing its own upserter) and creates
    the state tables, so mapped tasks start on a checked setup. Returns ``{"location", "window",
    "total", "batches": [{"lo", "hi"}]}`` (JSON-safe, for XCom); there is always at least one batch.
    """
    o = options or SyncOptions()
    loc = config.location(location)
    eng = get_engine(config, engine)
    tables = _prepare(config, eng)
    if check_connection and not o.dry_run:
        _require_connection(loc)
    win = _window(window, o.full_refresh)
    with eng.connect() as conn:
        total, ranges = plan_key_ranges(conn, Source(config, loc, tables, eng.dialect.name), win, batch_rows)
    if not o.dry_run:
        with eng.begin() as conn:
            if state.get_run(conn, tables, o.run_id, loc.name) is None:
                state.write_run(
                    conn,
                    tables,
                    {
                        "run_id": o.run_id,
                        "location": loc.name,
                        "dag_id": o.dag_id,
                        "status": "running",
                        "window_start": win.start,
                        "window_end": win.end,
                        "dry_run": o.dry_run,
                        "full_refresh": o.full_refresh,
                        "started_at": state.utcnow(),
                    },
                )
    log.info("plan %s: %d rows in %d batches for window %s", loc.name, total, len(ranges), win.as_dict())
    return {
        "location": loc.name,
        "window": win.as_dict(),
        "total": total,
        "batches": [r.as_dict() for r in ranges],
    }


def sync_batch(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None,
    key_range: KeyRange | Mapping[str, Any] | None = None,
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: Upserter | Callable[[LocationConfig], Upserter] | None = None,
) -> dict[str, Any]:
    """Sync the rows of one key range (window + pending); returns the batch's counts.

    Safe to retry: rows already recorded come out ``unchanged`` the second time.
    Raises the hook's ``GrowthHubAuthError`` (the task must fail) and :class:`SyncInvariantError`.
    """
    o = options or SyncOptions()
    loc = config.location(location)
    eng = get_engine(config, engine)
    kr = key_range if isinstance(key_range, KeyRange) else KeyRange.from_dict(key_range)
    runner = _BatchRunner(config, loc, eng, o, upserter)
    summary = runner.run_range(_window(window, o.full_refresh), kr)
    log.info("batch %s %s: %s", loc.name, kr.as_dict(), _counts_line(summary))
    return summary.as_dict()


def finalize_run(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None,
    batches: Iterable[Mapping[str, Any]],
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: Upserter | Callable[[LocationConfig], Upserter] | None = None,
    error: str | None = None,
    build_docs: bool = True,
) -> dict[str, Any]:
    """Settle the run's leftovers, add up the batches, check the invariant, write the run row,
    render Data Docs.

    Leftovers are rows the batches left pending for identity reasons (:data:`LEFTOVERS`): a
    contact two mapped tasks raced for, or a row whose winner gave its identity up. They were
    counted by their batch; what settling them did is reported under ``leftovers``.

    Returns the run summary with ``reject_rate`` and ``threshold_breached`` for alerting.
    Writing twice for the same run keeps one row. Raises :class:`SyncInvariantError` after
    recording a run whose counts do not add up.
    """
    o = options or SyncOptions()
    loc = config.location(location)
    eng = get_engine(config, engine)
    tables = state.state_tables(config.state)
    state.ensure_state(eng, tables)
    win = _window(window, o.full_refresh)
    leftovers = None if o.dry_run or error else _settle_leftovers(config, loc, eng, o, upserter)
    total, n = Summary(), 0
    for b in batches:
        total.add(b)
        n += 1
    # rows still in quarantine and unchanged since were alerted on when they first failed
    failed_rows = (
        total.quarantined + total.rejected + total.displaced - total.reasons.get(STILL_QUARANTINED, 0)
    )
    rate = failed_rows / total.extracted if total.extracted else 0.0
    status = "failed" if error or not total.invariant_ok else "success"
    docs = None
    if build_docs and o.keep_results and total.checked:
        try:
            checker = _checker_for(config, tuple(_check_columns(config)), True)
            docs = checker.build_data_docs(_gx_run_name(o.run_id, loc.name) + "__")
        except Exception as exc:  # Data Docs are a report: never fail a sync over them
            log.warning("Data Docs not rendered: %s", exc)
    details = {**total.as_dict(), "reject_rate": rate, "data_docs": docs, "error": error}
    if leftovers is not None and leftovers.extracted:
        details["leftovers"] = {k: getattr(leftovers, k) for k in ("extracted", *OUTCOMES, "displaced")}
    row = {
        "run_id": o.run_id,
        "location": loc.name,
        "dag_id": o.dag_id,
        "window_start": win.start,
        "window_end": win.end,
        "dry_run": o.dry_run,
        "full_refresh": o.full_refresh,
        "batches": n,
        **{k: getattr(total, k) for k in state.RUN_COUNTS},
        "warnings": total.warnings,
        "invariant_ok": total.invariant_ok,
        "status": status,
        "details": details,
        "started_at": state.utcnow(),
        "finished_at": state.utcnow(),
    }
    with eng.begin() as conn:
        state.write_run(conn, tables, row)
    if not o.dry_run and total.accounted > total.unchanged:
        state.analyze(eng, tables)
    out = {
        **details,
        "run_id": o.run_id,
        "location": loc.name,
        "window": win.as_dict(),
        "batches": n,
        "status": status,
        "invariant_ok": total.invariant_ok,
        "dry_run": o.dry_run,
        "threshold_breached": rate > config.quality.reject_rate_threshold,
    }
    log.info("run %s %s: %s; reject rate %.2f%%", o.run_id, loc.name, _counts_line(total), 100 * rate)
    if not total.invariant_ok:
        raise SyncInvariantError(
            f"run {o.run_id} {loc.name}: extracted {total.extracted} != {total.accounted}"
        )
    return out


def _settle_leftovers(
    config: SyncConfig,
    loc: LocationConfig,
    engine: Engine,
    o: SyncOptions,
    upserter: Upserter | Callable[[LocationConfig], Upserter] | None,
) -> Summary:
    tables = state.state_tables(config.state)
    runner = _BatchRunner(config, loc, engine, o, upserter)
    runner.settling = True
    settled = 0
    for _ in range(_SETTLE_ROUNDS):  # deciding a leftover can leave another (a chain of duplicates)
        with engine.connect() as conn:
            keys = state.pending_keys(conn, tables, loc.name, run_id=o.run_id, reasons=LEFTOVERS)
        if not keys:
            break
        settled += len(keys)
        for i in range(0, len(keys), config.batch_size):
            with engine.connect() as conn:
                rows = list(conn.execute(runner.source.by_keys(keys[i : i + config.batch_size])))
            if rows:
                runner.process(rows, from_pending=True)
    if settled:
        log.info("settled %d leftovers of run %s: %s", settled, o.run_id, _counts_line(runner.summary))
    return runner.summary


def sync(
    config: SyncConfig,
    location: str,
    window: Window | Mapping[str, Any] | None = None,
    options: SyncOptions | None = None,
    *,
    engine: Engine | None = None,
    upserter: Upserter | Callable[[LocationConfig], Upserter] | None = None,
) -> dict[str, Any]:
    """Plan, sync every batch in this process and finalise: one call for the CLI, demo and tests."""
    o = options or SyncOptions()
    eng = get_engine(config, engine)
    plan = plan_sync(
        config, location, window, engine=eng, options=o, batch_rows=10**12, check_connection=upserter is None
    )
    summaries = [
        sync_batch(config, location, plan["window"], b, o, engine=eng, upserter=upserter)
        for b in plan["batches"]
    ]
    return finalize_run(config, location, plan["window"], summaries, o, engine=eng, upserter=upserter)


def replay_quarantine(
    config: SyncConfig,
    location: str,
    options: SyncOptions | None = None,
    *,
    stage: str | None = None,
    contains: str | None = None,
    max_rows: int | None = None,
    engine: Engine | None = None,
    upserter: Upserter | Callable[[LocationConfig], Upserter] | None = None,
) -> dict[str, Any]:
    """Take the current source row of open quarantine rows, check and send it again.

    What now syncs (or is found already in step) is resolved, what still fails is updated
    (attempts + 1); rows gone from the source are marked ``ignored``. Returns the run summary.
    """
    o = options or SyncOptions(run_id=f"replay__{state.utcnow().isoformat()}")
    loc = config.location(location)
    eng = get_engine(config, engine)
    tables = _prepare(config, eng)
    with eng.connect() as conn:
        selected = state.open_quarantine(
            conn, tables, loc.name, stage=stage, contains=contains, limit=max_rows
        )
    keys = [r["source_key"] for r in selected]
    runner = _BatchRunner(config, loc, eng, o, upserter)
    runner.recheck = True
    # a replayed duplicate must still lose to the row it lost to, unless that row changed since
    winners = {m.group(1) for r in selected for e in r["errors"] if (m := _DUPLICATE.match(str(e)))} - set(
        keys
    )
    with eng.connect() as conn:
        context = list(conn.execute(runner.source.by_keys(sorted(winners)))) if winners else []
    found: set[str] = set()
    for i in range(0, len(keys), config.batch_size):
        part = keys[i : i + config.batch_size]
        with eng.connect() as conn:
            rows = list(conn.execute(runner.source.by_keys(part)))
        found.update(str(r[Narrow.KEY]) for r in rows)
        if rows:
            runner.process(rows, from_pending=False, context=context)
    gone = [k for k in keys if k not in found]
    if gone and not o.dry_run:
        with eng.begin() as conn:
            state.resolve_quarantine(conn, tables, loc.name, gone, now=state.utcnow(), status="ignored")
    out = finalize_run(config, loc.name, None, [runner.summary.as_dict()], o, engine=eng, upserter=upserter)
    return {**out, "selected": len(keys), "gone_from_source": len(gone)}


def _check_columns(config: SyncConfig) -> list[str]:
    """The check columns the mapper produces for ``config`` (keys of the GX context cache)."""
    from datetime import UTC, datetime

    cols = config.source_columns()
    row = [None] * len(cols)
    row[cols.index(config.source.updated_at_column)] = datetime.now(UTC)
    return list(Mapper(config, cols).map([row], "x").frame.columns)


def _counts_line(s: Summary) -> str:
    return ", ".join(f"{k} {getattr(s, k)}" for k in ("extracted", *OUTCOMES))
