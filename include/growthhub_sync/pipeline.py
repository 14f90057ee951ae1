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
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import create_engine

from growthhub_provider.masking import mask_pii
from growthhub_sync import state
from growthhub_sync.config import ConfigError, LocationConfig, SyncConfig, validate_source_columns
from growthhub_sync.diff import payload_hash, sorted_by_source, source_hashes
from growthhub_sync.extract import KeyRange, Narrow, Source, Window, plan_key_ranges, stream
from growthhub_sync.mapping import MappedBatch, Mapper

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine, Row

    from growthhub_sync.checks import QualityChecker

log = logging.getLogger(__name__)

_DUPLICATE = re.compile(r"^duplicate identity of (.+)$")
STILL_QUARANTINED = "unchanged in quarantine"
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
        for name in ("extracted", *OUTCOMES, "warnings", "checked"):
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
        self.recheck = False
        """Check and send quarantined rows even when unchanged (the replay)."""

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
        with self.engine.connect() as conn:
            # pending rows first: they waited longest; the window query leaves them out
            for pending in (True, False):
                stmt = self.source.selection(window, key_range, pending=pending)
                for chunk in stream(conn, stmt, size):
                    self.process(chunk, from_pending=pending)
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
            # an unchanged duplicate stays quarantined while its unchanged winner still outranks
            # it in this chunk; otherwise it takes the full path, duplicate check included
            where = {keys[i]: i for i in settled}
            for i in dups:
                winner = where.get(rows[i][Narrow.HELD_DUPLICATE_OF] or "")
                in_ledger = not o.full_refresh and rows[i][Narrow.LEDGER_PAYLOAD] is not None
                if winner is not None and _rank(rows[winner], True) > _rank(rows[i], in_ledger):
                    still_bad.append(i)
                else:
                    todo.append(i)
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
        refresh: dict[str, str] = {}
        sends: list[tuple[str, dict[str, Any]]] = []
        send_meta: dict[str, tuple[str, str]] = {}
        if todo:
            batch = self.mapper.map([full[keys[i]] for i in todo], self.location.location_id)
            result = self.checker(list(batch.frame.columns)).validate(
                batch.frame, batch.reasons, _gx_run_name(o.run_id, loc, self._chunk_no, keys[todo[0]])
            )
            s.checked = len(todo)
            errors = set(self.config.quality.errors) | {"identity"}
            passing: list[int] = []
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
            passing = self._dedupe(
                batch, passing, quarantine, s, ledger, [rows[i] for i in settled] + list(context)
            )
            s.quarantined += len(quarantine)
            for j in passing:
                k, p = batch.keys[j], batch.payloads[j]
                h = payload_hash(p)
                entry = ledger.get(k)
                if entry is not None and entry[1] == h and not o.full_refresh:
                    s.unchanged += 1
                    refresh[k] = src_hashes[todo[j]]
                else:
                    sends.append((k, p))
                    send_meta[k] = (h, src_hashes[todo[j]])

        if o.dry_run:
            for k, p in sends:
                s.updated += k in ledger
                s.created += k not in ledger
                if len(s.samples) < o.samples:
                    s.samples.append({"key": k, "payload": mask_payload(p)})
            self._finish(s)
            return

        now = state.utcnow()
        with self.engine.begin() as conn:
            gone = "changed or gone during the run"
            state.mark_pending(
                conn,
                self.tables,
                [
                    {"location": loc, "source_key": k, "reason": gone, "last_run_id": o.run_id}
                    for k in vanished
                ],
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
        if sends:
            self._send(sends, send_meta, s, from_pending)
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
        self, ids: Sequence[Sequence[tuple[str, str]]], rivals: Sequence[tuple[Sequence[Any], bool]]
    ) -> list[tuple[tuple[str, bool, str], list[tuple[str, str]]]]:
        """Rank and identities of the rivals that can share an identity with ``ids``.

        Normalising every unchanged row of a chunk would cost more than the whole diff, so only
        rows whose cheap key (:meth:`Mapper.cheap_ids`) hits are normalised.
        """
        hot = {x for row_ids in ids for x in row_ids}
        if not hot:
            return []
        cheap_hot = {("email", v) for k, v in hot if k == "email"} | {
            ("phone", v[-4:]) for k, v in hot if k == "phone"
        }
        cheap_ids = self.mapper.cheap_ids
        email, phone = Narrow.EMAIL, Narrow.PHONE
        picked = []
        for row, in_ledger in rivals:
            cheap = cheap_ids(row[email], row[phone])
            if cheap is None or not cheap.isdisjoint(cheap_hot):
                picked.append((row, in_ledger))
        found = self.mapper.identities([(r[email], r[phone]) for r, _ in picked])
        return [(_rank(r, led), i) for (r, led), i in zip(picked, found, strict=True) if set(i) & hot]

    def _dedupe(
        self,
        batch: MappedBatch,
        passing: list[int],
        quarantine: list[dict[str, Any]],
        s: Summary,
        ledger: Mapping[str, Any],
        settled: Sequence[Sequence[Any]],
    ) -> list[int]:
        """Same email or phone twice in a chunk: the best-ranked row wins (:func:`_rank`), the rest
        are quarantined as duplicates.

        ``settled`` rows (unchanged, or the winners a replayed duplicate lost to) compete but are
        never quarantined, so a rerun decides as the first run did.
        """
        ids = self.mapper.identities([self.mapper.contact(batch.rows[j]) for j in passing])
        contenders = [
            ((str(batch.updated_at[j]), batch.keys[j] in ledger, batch.keys[j]), ids[n], j)
            for n, j in enumerate(passing)
        ]
        contenders += [
            (rank, i, -1) for rank, i in self._identities_of_rivals(ids, [(r, True) for r in settled])
        ]
        owner: dict[tuple[str, str], str] = {}
        keep: list[int] = []
        for rank, mine, j in sorted(contenders, key=lambda c: c[0], reverse=True):
            key = rank[2]
            winner = next((owner[x] for x in mine if x in owner and owner[x] != key), None)
            if winner is not None and j >= 0:
                quarantine.append(
                    self._q(
                        key,
                        "quality",
                        None,
                        [f"duplicate identity of {winner}"],
                        batch.payloads[j],
                        self._hash_of[key],
                        duplicate_of=winner,
                    )
                )
                s.reasons["duplicate"] += 1
                continue
            if winner is None:
                owner.update(dict.fromkeys(mine, key))
            if j >= 0:
                keep.append(j)
        return sorted(keep)

    def _send(
        self,
        sends: list[tuple[str, dict[str, Any]]],
        meta: dict[str, tuple[str, str]],
        s: Summary,
        from_pending: bool,
    ) -> None:
        loc, o = self.location.name, self.options
        seen: set[str] = set()
        synced: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        deferred: list[dict[str, Any]] = []
        payloads = dict(sends)

        def flush() -> None:
            if not (synced or rejected or deferred):
                return
            now = state.utcnow()
            with self.engine.begin() as conn:
                state.upsert_ledger(conn, self.tables, [{**r, "last_synced_at": now} for r in synced])
                done = [r["source_key"] for r in synced]
                state.resolve_quarantine(conn, self.tables, loc, done, now=now)
                state.quarantine_rows(conn, self.tables, rejected, now=now)
                state.forget_source_hashes(conn, self.tables, loc, [r["source_key"] for r in rejected])
                state.mark_pending(conn, self.tables, deferred, now=now)
                state.clear_pending(conn, self.tables, loc, done + [r["source_key"] for r in rejected])
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
                    [
                        {"location": loc, "source_key": k, "reason": "no outcome", "last_run_id": o.run_id}
                        for k in missing
                    ],
                    now=state.utcnow(),
                )

    def _q(
        self,
        key: str,
        stage: str,
        status: int | None,
        errors: list[str],
        payload: dict[str, Any],
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
    """Fail the plan, naming the key, when the location's Airflow connection is not defined."""
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(location.conn_id)
    except Exception as exc:
        raise ConfigError(
            f"locations[{location.name}].conn_id: Airflow connection {location.conn_id!r} is not defined "
            f"({type(exc).__name__})"
        ) from None


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
    error: str | None = None,
    build_docs: bool = True,
) -> dict[str, Any]:
    """Add up the batches, check the invariant, write the run row, render Data Docs.

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
    total, n = Summary(), 0
    for b in batches:
        total.add(b)
        n += 1
    # rows still in quarantine and unchanged since were alerted on when they first failed
    failed_rows = total.quarantined + total.rejected - total.reasons.get(STILL_QUARANTINED, 0)
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
    return finalize_run(config, location, plan["window"], summaries, o, engine=eng)


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
    out = finalize_run(config, loc.name, None, [runner.summary.as_dict()], o, engine=eng)
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
