"""Identity ownership: one source row per email and per phone, per location.

GrowthHub merges upserts sharing an email or phone into one contact that holds whichever came
last. So a row is sent only if it owns each of its identities (normalised ``email:…`` and
``phone:…``), across chunks, mapped tasks and runs; ownership lives in the identities table.
Who wins a shared identity is :func:`rank`: the latest ``updated_at``, then the row already in
the ledger, then the key. A row that loses is quarantined as ``duplicate identity of <winner>``;
an owner a newer row outranks is *displaced* (dropped from the ledger, quarantined as the new
owner's duplicate), and rows that lost to an owner that gives an identity up are decided again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from growthhub_sync.diff import source_hashes
from growthhub_sync.outcomes import IDENTITY_FREED, OVERWRITTEN, QuarantineRow

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from growthhub_sync.extract import NarrowRow, Source
    from growthhub_sync.mapping import Mapper
    from growthhub_sync.state import StateStore

log = logging.getLogger(__name__)

Rank = tuple[str, bool, str]


def rank(updated_at: Any, in_ledger: bool, key: str) -> Rank:
    """Who wins a shared identity: latest ``updated_at``, then the row in the ledger, then the key."""
    return (str(updated_at), in_ledger, key)


def names(identities: Iterable[tuple[str, str]]) -> set[str]:
    """``("email", "a@b.c")`` → ``"email:a@b.c"``: the key of the identities table."""
    return {f"{kind}:{value}" for kind, value in identities}


@dataclass
class Candidate:
    """A changed row of a chunk that passed the checks and wants its identities."""

    key: str
    rank: Rank
    ids: list[str]
    """Its identity names, sorted."""
    payload: dict[str, Any]
    source_hash: str


class Holder(NamedTuple):
    """A row competing for identities from outside the chunk (or a candidate, seen as one)."""

    rank: Rank
    ids: set[str]
    source_hash: str


@dataclass
class Claim:
    """What :meth:`IdentityOwnership.claim` decided for a chunk's candidates."""

    keep: list[Candidate]
    """Candidates that own all their identities: to be sent."""
    duplicates: list[QuarantineRow] = field(default_factory=list)
    """Candidates that lost an identity (quarantined as duplicates)."""
    again: list[str] = field(default_factory=list)
    """Rows quarantined here as duplicates of a row that lost too: decided again at finalize."""
    displaced: int = 0
    """Rows synced earlier that a candidate outranked (quarantined as its duplicates)."""


class IdentityOwnership:
    """Decides and records who owns the identities of one location's rows."""

    def __init__(self, mapper: Mapper, source: Source, salt: str) -> None:
        self.mapper, self.source, self.salt = mapper, source, salt

    def identities_of(self, contacts: Sequence[tuple[Any, Any]]) -> list[set[str]]:
        """Identity names of raw ``(email, phone)`` pairs."""
        return [names(ids) for ids in self.mapper.identities(contacts)]

    def still_held(self, store: StateStore, rows: Sequence[NarrowRow]) -> list[bool]:
        """For unchanged duplicates: does the row each lost to still own one of its identities?

        An owner's rank only grows, so while it holds on the duplicate stays quarantined;
        otherwise it is decided again.
        """
        found = self.identities_of([(r.email, r.phone) for r in rows])
        owners = store.owners_of(set().union(*found), lock=False)
        return [
            any(owners[n] == str(r.held_duplicate_of) for n in ids)
            for r, ids in zip(rows, found, strict=True)
        ]

    def claim(
        self,
        store: StateStore,
        candidates: list[Candidate],
        rivals: Sequence[NarrowRow],
        quarantined: set[str],
        *,
        write: bool,
    ) -> Claim:
        """Same email or phone in another chunk, mapped task or run: one owner per identity.

        A candidate is kept only if it owns each of its identities: free ones, its own, ones whose
        owner's source row no longer has them, and ones whose owner it outranks (on the owner's
        current row). ``rivals`` (unchanged rows of the chunk, replayed duplicates' winners)
        compete but are never quarantined, so a rerun decides as the first run did.
        ``quarantined``: keys the chunk already quarantines. ``write=False`` (a dry run) decides
        without recording anything.
        """
        wanted = {n: c.key for c in candidates for n in c.ids}
        if write:
            owners, fresh = store.claim_free_identities(wanted)
        else:
            owners, fresh = store.owners_of(wanted, lock=False), set()
        # identities claimed just now belong to whoever wins them below; the owners from before
        # that are not in this chunk compete in the chunk's ranking, so a chain of duplicates is
        # settled in one pass (never quarantined there: they can only be displaced)
        before = {n: k for n, k in owners.items() if k is not None and n not in fresh}
        in_chunk = {c.key for c in candidates}
        owner_rows = self._source_rows(store.conn, set(before.values()))
        outside = [r for r in owner_rows if str(r.source_key) not in in_chunk]
        result = Claim(keep=[])
        ranked = self._dedupe(candidates, [*rivals, *outside], result.duplicates)
        here = {c.key for c in ranked}
        current = self._holders([r for r in owner_rows if str(r.source_key) not in here])
        current.update((c.key, Holder(c.rank, set(c.ids), c.source_hash)) for c in ranked)
        claims, displaced = self._contest(ranked, before, owners, current, result)
        kept_ids = {n for c in result.keep for n in c.ids}
        beaten = here - {c.key for c in result.keep} | set(displaced)
        result.again = [q.source_key for q in result.duplicates if q.duplicate_of in beaten]
        if write:
            store.release_identities(fresh - kept_ids)  # claimed above by rows that lost
            queued = quarantined | {q.source_key for q in result.duplicates}
            result.displaced = self._displace(store, displaced, current, queued)
            self._record(store, result.keep, claims, displaced, queued)
        return result

    def _contest(
        self,
        ranked: list[Candidate],
        before: Mapping[str, str],
        owners: Mapping[str, str | None],
        current: Mapping[str, Holder],
        result: Claim,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Each candidate against the earlier owners of its identities; fills ``result.keep`` and
        ``result.duplicates``. Returns the claims (identity → key) and the displaced owners
        (old owner → the candidate that displaced it)."""
        claims: dict[str, str] = {}
        displaced: dict[str, str] = {}
        order = {id(c): i for i, c in enumerate(ranked)}
        # best first, so an owner a better row displaces no longer beats the rows below it
        for c in sorted(ranked, key=lambda c: current[c.key].rank, reverse=True):
            others = {
                owner
                for n in c.ids
                if (owner := before.get(n)) not in (None, c.key, *displaced)
                and owner in current
                and n in current[owner].ids
            }
            winner = max(others, key=lambda r: current[r].rank, default=None)
            if winner is not None and current[winner].rank > current[c.key].rank:
                result.duplicates.append(QuarantineRow.duplicate(c.key, winner, c.payload, c.source_hash))
                continue
            result.keep.append(c)
            claims.update((n, c.key) for n in c.ids if owners[n] != c.key)
            displaced.update(dict.fromkeys(others, c.key))
        result.keep.sort(key=lambda c: order[id(c)])
        return claims, displaced

    def _displace(
        self, store: StateStore, displaced: Mapping[str, str], current: Mapping[str, Holder], queued: set[str]
    ) -> int:
        """Quarantine outranked owners as duplicates of their new owners; returns how many."""
        if not displaced:
            return 0
        # not an outcome of this chunk's rows (a displaced row was counted when it synced)
        moved = [
            QuarantineRow.duplicate(old, new, None, current[old].source_hash)
            for old, new in displaced.items()
            if old not in queued
        ]
        log.info("%d synced rows displaced by newer rows sharing their email or phone", len(moved))
        store.quarantine(moved)
        # an owner this run has not recorded may still be in flight (another task, or a killed
        # one, whose write may land after this row's): send this row again at the end
        recorded = store.synced_in_run(displaced)
        racers = sorted({new for old, new in displaced.items() if old not in recorded})
        store.mark_pending(dict.fromkeys(racers, OVERWRITTEN))
        store.drop_from_ledger(displaced)
        return len(moved)

    def _record(
        self,
        store: StateStore,
        keep: Sequence[Candidate],
        claims: Mapping[str, str],
        displaced: Mapping[str, str],
        queued: set[str],
    ) -> None:
        """Move ownership to the kept rows; free what a row no longer has and what a displaced row owned."""
        kept = {c.key: set(c.ids) for c in keep}
        owned = store.identities_owned(kept)
        store.claim_identities(claims)
        stale = {n for k, ns in owned.items() for n in ns - kept[k]} - set(claims)
        store.release_identities(stale)
        store.release_owned(displaced)
        gave_up = {k for k, ns in owned.items() if ns - kept[k]} | set(displaced)
        self.redecide(store, gave_up, skip=queued | set(displaced))

    def _dedupe(
        self, candidates: list[Candidate], rivals: Sequence[NarrowRow], duplicates: list[QuarantineRow]
    ) -> list[Candidate]:
        """Same email or phone twice: the best-ranked row wins, the chunk's other rows are
        quarantined as its duplicates (appended to ``duplicates``); rivals never are."""
        contenders: list[tuple[Rank, Iterable[str], Candidate | None]] = [
            (c.rank, c.ids, c) for c in candidates
        ]
        contenders += [(r, ids, None) for r, ids in self._rivals_sharing(candidates, rivals)]
        owner: dict[str, str] = {}
        keep: set[int] = set()
        for r, mine, c in sorted(contenders, key=lambda x: x[0], reverse=True):
            key = r[2]
            winner = next((owner[x] for x in mine if x in owner and owner[x] != key), None)
            if winner is not None and c is not None:
                duplicates.append(QuarantineRow.duplicate(key, winner, c.payload, c.source_hash))
                continue
            if winner is None:
                owner.update(dict.fromkeys(mine, key))
            if c is not None:
                keep.add(id(c))
        return [c for c in candidates if id(c) in keep]

    def _rivals_sharing(
        self, candidates: Sequence[Candidate], rivals: Sequence[NarrowRow]
    ) -> list[tuple[Rank, set[str]]]:
        """Rank and identities of the rivals that can share an identity with the candidates.

        Normalising every unchanged row of a chunk would cost more than the whole diff, so only
        rows whose cheap key (:meth:`Mapper.cheap_ids`) hits are normalised.
        """
        hot = {n for c in candidates for n in c.ids}
        if not hot:
            return []
        pairs = [tuple(n.split(":", 1)) for n in hot]
        cheap_hot = {("email", v) for k, v in pairs if k == "email"} | {
            ("phone", v[-4:]) for k, v in pairs if k == "phone"
        }
        cheap_ids = self.mapper.cheap_ids
        picked = []
        for row in rivals:
            key, updated_at, email, phone, *_ = row
            cheap = cheap_ids(email, phone)
            if cheap is None or not cheap.isdisjoint(cheap_hot):
                picked.append((rank(updated_at, True, str(key)), email, phone))
        found = self.identities_of([(email, phone) for _, email, phone in picked])
        return [(r, ids) for (r, _, _), ids in zip(picked, found, strict=True) if ids & hot]

    def _source_rows(self, conn: Connection, keys: Iterable[str]) -> list[NarrowRow]:
        """The current narrow source rows of ``keys`` (rows gone from the source are left out)."""
        wanted = sorted(keys)
        rows: list[NarrowRow] = []
        for i in range(0, len(wanted), 2000):
            rows.extend(conn.execute(self.source.by_keys(wanted[i : i + 2000])))  # type: ignore[arg-type]
        return rows

    def _holders(self, rows: Sequence[NarrowRow]) -> dict[str, Holder]:
        """Rank, identities and source hash of narrow source rows, by key."""
        found = self.identities_of([(r.email, r.phone) for r in rows])
        hashes = source_hashes([r.digest for r in rows], self.salt)
        return {
            str(r.source_key): Holder(
                rank(r.updated_at, r.ledger_payload_hash is not None, str(r.source_key)), ids, h
            )
            for r, ids, h in zip(rows, found, hashes, strict=True)
        }

    def redecide(self, store: StateStore, owners: Iterable[str], skip: Iterable[str] = ()) -> None:
        """Rows quarantined as duplicates of ``owners`` (which gave identities up): pending again."""
        skipped = set(skip)
        retry = [k for k in store.duplicates_of(owners) if k not in skipped]
        store.mark_pending(dict.fromkeys(retry, IDENTITY_FREED))

    def lost_while_sending(
        self, store: StateStore, sent: Mapping[str, Candidate]
    ) -> tuple[dict[str, str], list[str]]:
        """Sent rows that no longer own what they claimed: another mapped task took it meanwhile.

        Returns the rows a newer row beat (→ that owner) and the rows whose identity was freed
        (their owner gave it up): neither may be recorded as synced. Whose write reached the CRM
        last is unknown, so a beaten row is quarantined as the owner's duplicate and the owner is
        made to send again (:data:`OVERWRITTEN`: pending, its ledger entry no longer matching); a
        row whose identity was freed is decided again when the run finalises (:data:`IDENTITY_FREED`).
        """
        owners = store.owners_of(n for c in sent.values() for n in c.ids)
        lost = {k: o for k, c in sent.items() for n in c.ids if (o := owners.get(n)) not in (None, k)}
        freed = [k for k, c in sent.items() if k not in lost and any(owners.get(n) is None for n in c.ids)]
        if not (lost or freed):
            return {}, []
        log.warning("%d sent rows lost their email or phone to another row meanwhile", len(lost) + len(freed))
        store.quarantine(
            [QuarantineRow.duplicate(k, w, sent[k].payload, sent[k].source_hash) for k, w in lost.items()]
        )
        winners = sorted(set(lost.values()))
        store.invalidate_ledger(winners)
        store.mark_pending({**dict.fromkeys(winners, OVERWRITTEN), **dict.fromkeys(freed, IDENTITY_FREED)})
        return lost, freed
