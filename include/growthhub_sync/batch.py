"""The batch flow: one location's rows, chunk by chunk, through every stage. Read this first.

Per chunk of narrow rows (key, updated-at, email, phone, digest, ledger and quarantine hashes):

1. **diff** (:mod:`~growthhub_sync.diff`): rows whose source hash the ledger holds are
   ``unchanged``; rows unchanged since they were quarantined stay so; the rest are *changed*;
2. **map** (:mod:`~growthhub_sync.mapping`) the changed rows' full rows to payloads, and
   **check** them (:mod:`~growthhub_sync.checks`, Great Expectations): errors are quarantined,
   warnings drop the field;
3. **identity** (:mod:`~growthhub_sync.identity`): one row per email / phone, across chunks,
   tasks and runs; losers are quarantined as duplicates;
4. **record** the chunk's decisions in one transaction (:class:`~growthhub_sync.state.StateStore`);
   payloads the ledger already holds are ``unchanged``;
5. **upsert** the rest (:mod:`~growthhub_sync.upsert`) and record each outcome as it arrives:
   ``created``/``updated`` in the ledger, ``rejected`` (400/422) in quarantine, the rest
   ``deferred`` (pending for the next run).

Every row ends in exactly one outcome (:class:`~growthhub_sync.outcomes.Summary` checks it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from growthhub_provider.masking import mask_pii
from growthhub_sync.checks import checker_for
from growthhub_sync.diff import Triage, payload_hash, source_hashes, triage
from growthhub_sync.extract import KeyRange, Source, Window, stream
from growthhub_sync.fields import reason_codes
from growthhub_sync.identity import Candidate, Claim, IdentityOwnership, names, rank
from growthhub_sync.mapping import MappedBatch, Mapper
from growthhub_sync.outcomes import (
    CHANGED_OR_GONE,
    IDENTITY_FREED,
    NO_OUTCOME,
    OVERWRITTEN,
    RESEND,
    QuarantineRow,
    Summary,
    SyncedRow,
)
from growthhub_sync.reasons import DUPLICATE_IDENTITY, api_code
from growthhub_sync.state import StateStore, state_tables
from growthhub_sync.upsert import Upserter, UpserterSource, resolve_upserter

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from growthhub_provider.client import UpsertOutcome
    from growthhub_sync.config import LocationConfig, SyncConfig
    from growthhub_sync.extract import NarrowRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncOptions:
    """How to run. ``full_refresh`` ignores the window *and* the ledger: every row is checked and sent."""

    run_id: str = "manual"
    dag_id: str | None = None
    dry_run: bool = False
    full_refresh: bool = False
    samples: int = 5
    """Masked sample payloads kept in a dry run's summary."""
    keep_results: bool = True
    """Store GX validation results (JSON) for Data Docs."""
    flush_every: int = 500
    allow_mass_delete: bool = False
    """Let a run delete or tag more than ``deletes.max_fraction`` of a location's contacts."""
    """API outcomes recorded per transaction: bounds what a killed worker sends twice."""


@dataclass
class _Chunk:
    """One chunk on its way through the stages."""

    rows: Sequence[NarrowRow]
    keys: list[str]
    hashes: list[str]
    """Source hashes, by row index."""
    triage: Triage
    ledger: dict[str, str] = field(default_factory=dict)
    """Ledger payload hash by key (empty on a full refresh: nothing counts as sent)."""
    vanished: list[str] = field(default_factory=list)
    """Changed rows gone from the source (or re-routed) before their full row was read."""
    quarantine: list[QuarantineRow] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)

    def keys_of(self, indexes: Sequence[int]) -> list[str]:
        return [self.keys[i] for i in indexes]


HoldBack = Callable[[StateStore, list[Candidate], bool], tuple[list[Candidate], list[QuarantineRow]]]
"""(store, a chunk's candidates, write) → (candidates to decide as usual, planned losers quarantined)."""


class _Outgoing(NamedTuple):
    row: Candidate
    payload_hash: str


@dataclass
class _Received:
    """Upsert outcomes not yet recorded (flushed every ``SyncOptions.flush_every`` rows)."""

    synced: list[SyncedRow] = field(default_factory=list)
    rejected: list[QuarantineRow] = field(default_factory=list)
    deferred: dict[str, str] = field(default_factory=dict)
    status_of: dict[str, str] = field(default_factory=dict)
    """created / updated of each synced row, to take back if it lost its identity meanwhile."""

    def __len__(self) -> int:
        return len(self.synced) + len(self.rejected) + len(self.deferred)


class BatchRunner:
    """Runs chunks of one location through every stage and adds their outcomes to :attr:`summary`."""

    def __init__(
        self,
        config: SyncConfig,
        location: LocationConfig,
        engine: Engine,
        options: SyncOptions,
        upserter: UpserterSource = None,
    ) -> None:
        config = config.for_location(location)
        self.config, self.location, self.engine, self.options = config, location, engine, options
        self.tables = state_tables(config.state)
        self.source = Source(config, location, self.tables, engine.dialect.name)
        self.mapper = Mapper(config, self.source.columns)
        self.key_index = self.source.columns.index(config.source.key_column)
        self.salt = f"{config.fingerprint}:{location.location_id}:"
        self.identity = IdentityOwnership(self.mapper, self.source, self.salt)
        self._upserter_source = upserter
        self._upserter: Upserter | None = None
        self.summary = Summary(max_samples=options.samples)
        self._chunk_no = 0
        self.recheck = False
        """Check and send quarantined rows even when unchanged (the replay)."""
        self.settling = False
        """Sending a run's leftovers after its batches: no other task of the run is sending."""
        self.before_chunk: Callable[[], None] | None = None
        """Called before each chunk of a real run; raises to stop the batch (a refused token)."""
        self.hold_back: HoldBack | None = None
        """Takes the run's planned losers out of a chunk's candidates (:mod:`~growthhub_sync.winners`)."""

    def store(self, conn: Connection) -> StateStore:
        """This location's state in one transaction of this run."""
        o = self.options
        return StateStore(conn, self.tables, self.location.name, run_id=o.run_id, dag_id=o.dag_id)

    def upserter(self) -> Upserter:
        """Created on first use: a chunk of unchanged rows sends nothing."""
        if self._upserter is None:
            self._upserter = resolve_upserter(self._upserter_source, self.location)
        return self._upserter

    def run_range(self, window: Window, key_range: KeyRange) -> Summary:
        size = self.config.rows_per_chunk
        done: set[str] = set()
        with self.engine.connect() as conn:
            # pending rows first: they waited longest. The window query leaves pending rows out,
            # but it starts after the pending pass cleared theirs: skip the ones already done
            for chunk in stream(conn, self.source.selection(window, key_range, pending=True), size):
                done.update(str(r.source_key) for r in chunk)
                self.process(chunk, from_pending=True)
            for chunk in stream(conn, self.source.selection(window, key_range, pending=False), size):
                rows = [r for r in chunk if str(r.source_key) not in done] if done else chunk
                if rows:
                    self.process(rows, from_pending=False)
        return self.summary

    def run_keys(
        self, keys: Sequence[str], *, from_pending: bool, context: Sequence[NarrowRow] = ()
    ) -> set[str]:
        """Process the current source rows of ``keys``; returns the keys found in the source."""
        found: set[str] = set()
        size = self.config.rows_per_chunk
        for i in range(0, len(keys), size):
            with self.engine.connect() as conn:
                rows = list(conn.execute(self.source.by_keys(keys[i : i + size])))
            found.update(str(r.source_key) for r in rows)
            if rows:
                self.process(rows, from_pending=from_pending, context=context)  # type: ignore[arg-type]
        return found

    def process(
        self, rows: Sequence[NarrowRow], *, from_pending: bool, context: Sequence[NarrowRow] = ()
    ) -> None:
        """One chunk through every stage; leaves one outcome per row in :attr:`summary`.

        Full rows are read only for the rows that changed. ``context`` rows only take part in
        the duplicate check.
        """
        if self.before_chunk is not None and not self.options.dry_run:
            self.before_chunk()
        self._chunk_no += 1
        s = Summary(extracted=len(rows), max_samples=self.options.samples)
        chunk = self._diff(rows, s)
        if chunk.triage.changed:
            self._map_and_check(chunk, s)
        rivals = [rows[i] for i in chunk.triage.settled] + list(context)
        if self.options.dry_run:
            self._dry_run(chunk, rivals, s)
        else:
            sends = self._record(chunk, rivals, s, from_pending=from_pending)
            if sends:
                self._send(sends, s)
        s.check_invariant("chunk")
        self.summary.add(s)

    # -- 1. diff ----------------------------------------------------------------------------------
    def _diff(self, rows: Sequence[NarrowRow], s: Summary) -> _Chunk:
        keys, digests = [], []
        for key, _updated, _email, _phone, digest, _ledger_source, _ledger_payload, _held, _dup in rows:
            keys.append(str(key))
            digests.append(digest)
        hashes = source_hashes(digests, self.salt)
        o = self.options
        t = triage(rows, hashes, use_ledger=not o.full_refresh, use_held=not self.recheck)
        chunk = _Chunk(rows, keys, hashes, t)
        if t.held_duplicates:
            with self.engine.connect() as conn:
                held = self.identity.still_held(self.store(conn), [rows[i] for i in t.held_duplicates])
            for i, still in zip(t.held_duplicates, held, strict=True):
                (t.still_quarantined if still else t.changed).append(i)
            t.changed.sort()
        if t.changed and not o.full_refresh:
            chunk.ledger = {
                k: r.ledger_payload_hash
                for k, r in zip(keys, rows, strict=True)
                if r.ledger_payload_hash is not None
            }
        s.unchanged = len(t.settled)
        s.quarantined = s.still_quarantined = len(t.still_quarantined)
        return chunk

    # -- 2. map and check -------------------------------------------------------------------------
    def _map_and_check(self, chunk: _Chunk, s: Summary) -> None:
        """Map the changed rows, run the GX suite, quarantine errors; the rest become candidates."""
        t = chunk.triage
        full = self._full_rows(chunk.keys_of(t.changed))
        chunk.vanished = [k for k in chunk.keys_of(t.changed) if k not in full]
        t.changed = [i for i in t.changed if chunk.keys[i] in full]
        s.deferred = len(chunk.vanished)
        if not t.changed:
            return
        batch = self.mapper.map([full[chunk.keys[i]] for i in t.changed], self.location.location_id)
        checker = checker_for(self.config, tuple(batch.frame.columns), self.options.keep_results)
        run_name = gx_run_name(
            self.options.run_id, self.location.name, self._chunk_no, chunk.keys[t.changed[0]]
        )
        result = checker.validate(batch.frame, batch.reasons, run_name)
        s.checked = len(t.changed)
        errors = set(self.config.quality.errors) | {"identity"}
        passing = []
        for j, i in enumerate(t.changed):
            failed = result.failures.get(j, {})
            if bad := {c: r for c, r in failed.items() if c in errors}:
                codes = tuple(reason_codes(bad, failed))
                chunk.quarantine.append(
                    QuarantineRow(
                        batch.keys[j],
                        "quality",
                        list(bad.values()),
                        codes,
                        batch.payloads[j],
                        chunk.hashes[i],
                    )
                )
                s.reasons.update(codes)
                continue
            for check in failed:  # a warning: send the row without the bad field
                for payload_key in batch.fields_of_check.get(check, []):
                    batch.payloads[j].pop(payload_key, None)
            s.warnings += bool(failed)
            passing.append((j, i))
        chunk.candidates = self._candidates(batch, passing, chunk)

    def _candidates(
        self, batch: MappedBatch, passing: list[tuple[int, int]], chunk: _Chunk
    ) -> list[Candidate]:
        found = self.mapper.identities([self.mapper.contact(batch.rows[j]) for j, _ in passing])
        return [
            Candidate(
                key=batch.keys[j],
                rank=rank(batch.updated_at[j], batch.keys[j] in chunk.ledger, batch.keys[j]),
                ids=sorted(names(ids)),
                payload=batch.payloads[j],
                source_hash=chunk.hashes[i],
            )
            for (j, i), ids in zip(passing, found, strict=True)
        ]

    def _full_rows(self, keys: Sequence[str]) -> dict[str, Sequence[Any]]:
        """The full source rows of ``keys`` (the changed ones of a chunk), by key."""
        out: dict[str, Sequence[Any]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 5000):
                stmt = self.source.by_keys(keys[i : i + 5000], full=True)
                out.update((str(r[self.key_index]), r) for r in conn.execute(stmt))
        return out

    # -- 3 + 4. identity and record ---------------------------------------------------------------
    def _claim(
        self, store: StateStore, chunk: _Chunk, rivals: list[NarrowRow], s: Summary, write: bool
    ) -> Claim:
        if not chunk.candidates:
            return Claim(keep=[])
        if self.hold_back is not None and not self.settling:  # settling: every batch has decided
            chunk.candidates, held = self.hold_back(store, chunk.candidates, write)
            chunk.quarantine += held
            s.reasons[DUPLICATE_IDENTITY] += len(held)
            if not chunk.candidates:
                return Claim(keep=[])
        queued = {q.source_key for q in chunk.quarantine}
        claim = self.identity.claim(store, chunk.candidates, rivals, queued, write=write)
        chunk.quarantine += claim.duplicates
        s.reasons[DUPLICATE_IDENTITY] += len(claim.duplicates) + claim.displaced
        s.displaced += claim.displaced
        return claim

    def _split_sends(
        self, keep: list[Candidate], chunk: _Chunk, s: Summary
    ) -> tuple[list[_Outgoing], dict[str, str]]:
        """Rows to send, and rows whose payload the ledger already holds (key → source hash)."""
        sends: list[_Outgoing] = []
        in_step: dict[str, str] = {}
        for c in keep:
            h = payload_hash(c.payload)
            if chunk.ledger.get(c.key) == h and not self.options.full_refresh:
                s.unchanged += 1
                in_step[c.key] = c.source_hash
            else:
                sends.append(_Outgoing(c, h))
        return sends, in_step

    def _dry_run(self, chunk: _Chunk, rivals: list[NarrowRow], s: Summary) -> None:
        """Decide as a real run would, record nothing, keep masked samples of what would be sent."""
        with self.engine.connect() as conn:
            claim = self._claim(self.store(conn), chunk, rivals, s, write=False)
        sends, _ = self._split_sends(claim.keep, chunk, s)
        s.quarantined += len(chunk.quarantine)
        for out in sends:
            s.count("updated" if out.row.key in chunk.ledger else "created")
            s.add_sample(out.row.key, out.row.payload)

    def _record(
        self, chunk: _Chunk, rivals: list[NarrowRow], s: Summary, *, from_pending: bool
    ) -> list[_Outgoing]:
        """The chunk's decisions, in one transaction; returns the rows to send."""
        t = chunk.triage
        with self.engine.begin() as conn:
            store = self.store(conn)
            claim = self._claim(store, chunk, rivals, s, write=True)
            sends, in_step = self._split_sends(claim.keep, chunk, s)
            s.quarantined += len(chunk.quarantine)
            quarantined = [q.source_key for q in chunk.quarantine]
            store.mark_pending(dict.fromkeys(chunk.vanished, CHANGED_OR_GONE))
            store.quarantine(chunk.quarantine)
            store.requarantine(chunk.keys_of(t.still_quarantined))
            store.forget_source_hashes(quarantined)
            store.refresh_source_hashes(in_step)
            store.resolve_quarantine(in_step)
            if from_pending:
                settled = chunk.keys_of(t.settled) + chunk.keys_of(t.still_quarantined)
                store.clear_pending(settled + quarantined + list(in_step))
            store.mark_pending(dict.fromkeys(claim.again, IDENTITY_FREED))
        return sends

    # -- 5. upsert --------------------------------------------------------------------------------
    def _send(self, sends: list[_Outgoing], s: Summary) -> None:
        by_key = {out.row.key: out for out in sends}
        seen: set[str] = set()
        received = _Received()
        try:
            rows = [(out.row.key, out.row.payload) for out in sends]
            reserve = self.config.quota.daily_reserve
            for outcome in self.upserter().upsert_contacts(rows, daily_reserve=reserve):
                key = str(outcome.key)
                if key in seen or key not in by_key:
                    continue
                seen.add(key)
                self._receive(outcome, by_key[key], received, s)
                if len(received) >= self.options.flush_every:
                    self._flush(received, by_key, s)
        finally:
            self._flush(received, by_key, s)  # record what was sent even when an auth error ends the task
        self._count_requests(s)
        missing = [k for k in by_key if k not in seen]
        if missing:  # the upserter owes one outcome per row; never lose a row if it does not deliver
            log.warning("%d rows without an upsert outcome: deferred", len(missing))
            s.deferred += len(missing)
            with self.engine.begin() as conn:
                self.store(conn).mark_pending(dict.fromkeys(missing, NO_OUTCOME))

    def _count_requests(self, s: Summary) -> None:
        """The client's counters of the send just done, for metrics (a fake upserter has none)."""
        stats = getattr(self._upserter, "last_batch_stats", None)
        if stats is None:
            return
        s.upserts += stats.sent
        s.throttled += stats.throttled
        s.retried += stats.retried
        if stats.daily_remaining is not None:
            s.daily_remaining = stats.daily_remaining

    def _receive(self, outcome: UpsertOutcome, out: _Outgoing, received: _Received, s: Summary) -> None:
        key, messages = out.row.key, list(outcome.messages or [])
        if outcome.status in ("created", "updated"):
            s.count(outcome.status)
            received.synced.append(SyncedRow(key, outcome.contact_id, out.payload_hash, out.row.source_hash))
            received.status_of[key] = outcome.status
        elif outcome.status == "rejected":
            s.rejected += 1
            code = api_code(outcome.http_status)
            s.reasons[code] += 1
            s.messages.update(mask_pii(str(m)) for m in messages)
            received.rejected.append(
                QuarantineRow(
                    key, "api", messages, (code,), out.row.payload, out.row.source_hash, outcome.http_status
                )
            )
        else:  # failed (transient, after retries) or skipped (daily quota reserve reached)
            s.deferred += 1
            received.deferred[key] = (
                f"{outcome.status}: {'; '.join(str(m) for m in messages) or outcome.status}"
            )

    def _flush(self, received: _Received, by_key: dict[str, _Outgoing], s: Summary) -> None:
        """Record received outcomes in one transaction."""
        if not len(received):
            return
        with self.engine.begin() as conn:
            store = self.store(conn)
            sent = {r.source_key: by_key[r.source_key].row for r in received.synced}
            lost, freed = self.identity.lost_while_sending(store, sent)
            for key in [*lost, *freed]:  # not synced after all: a duplicate, or decided again
                s.count(received.status_of.pop(key), -1)
            s.quarantined += len(lost)
            s.reasons[DUPLICATE_IDENTITY] += len(lost)
            s.deferred += len(freed)
            kept = [r for r in received.synced if r.source_key not in lost and r.source_key not in freed]
            store.record_synced(kept)
            done = [r.source_key for r in kept]
            stale = self._overwritten(store, done)
            store.invalidate_ledger(stale)
            store.mark_pending(dict.fromkeys(stale, RESEND))
            store.resolve_quarantine(done)
            store.quarantine(received.rejected)
            refused = [q.source_key for q in received.rejected]
            store.forget_source_hashes(refused)
            # a row the API refused owns nothing: rows it beat to an identity are decided again
            store.release_owned(refused)
            self.identity.redecide(store, refused)
            store.mark_pending(received.deferred)
            resent = set(stale)
            store.clear_pending([k for k in done if k not in resent] + refused + list(lost))
        received.synced.clear()
        received.rejected.clear()
        received.deferred.clear()

    def _overwritten(self, store: StateStore, done: list[str]) -> list[str]:
        """Rows just recorded whose contact a row that lost its identity to them may have written
        after them: sent again once the batches are done (no other task can race them then)."""
        if self.settling:
            return []
        return [
            k
            for k, (reason, run_id) in store.pending_reasons(done).items()
            if reason == OVERWRITTEN and run_id == self.options.run_id
        ]


def gx_run_name(*parts: Any) -> str:
    """A GX run name from its parts (GX keys results by it; finalize selects a run's by prefix)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "__".join(str(p) for p in parts))[:200]


def describe_gx_run(run_name: str, locations: Sequence[str]) -> tuple[str, str, str]:
    """(run, location, batch) of a batch's :func:`gx_run_name`: the Data Docs index's names.

    A run id may hold ``__`` itself (``manual__2026-...``), so the configured locations split it.
    """
    for location in sorted(locations, key=len, reverse=True):
        run, sep, rest = run_name.rpartition(f"__{gx_run_name(location)}__")
        if sep:
            chunk, _, first_key = rest.partition("__")
            return run, location, f"chunk {chunk}, from key {first_key}"
    return run_name, "", ""
