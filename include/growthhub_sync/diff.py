"""Change detection: hash what would be sent and compare it with the ledger.

Two hashes per row. The *payload hash* (blake2b of the payload's canonical JSON) is the
truth: equal to the ledger's means the CRM already holds this payload. The *source hash*
(the row's values as the database serialises them + config fingerprint, without updated-at)
is a shortcut: a row whose
updated-at was bumped but whose values did not change is recognised without mapping,
normalising or validating it, which keeps a touched-but-unchanged table cheap to scan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any


def canonical_json(payload: Mapping[str, Any]) -> bytes:
    """Key-sorted, whitespace-free JSON: equal payloads give equal bytes."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode()


def payload_hash(payload: Mapping[str, Any]) -> str:
    return blake2b(canonical_json(payload), digest_size=16).hexdigest()


def source_hashes(digests: Sequence[Any], salt: str) -> list[str]:
    """Salt the database's serialisation of each row (values except updated-at) with the config
    fingerprint and hash it: a config change re-evaluates every row."""
    prefix = salt.encode()
    return [blake2b(prefix + str(d).encode(), digest_size=16).hexdigest() for d in digests]


@dataclass
class Triage:
    """A chunk's narrow rows (:class:`NarrowRow`), sorted by source hash into row indexes."""

    settled: list[int] = field(default_factory=list)
    """The ledger holds this exact source hash: unchanged since it was synced."""
    changed: list[int] = field(default_factory=list)
    """The full path: map, check, send."""
    still_quarantined: list[int] = field(default_factory=list)
    """Unchanged since it was quarantined (for a reason other than a duplicate identity)."""
    held_duplicates: list[int] = field(default_factory=list)
    """Unchanged since it was quarantined as a duplicate: stays so only while its winner holds on."""


def triage(
    rows: Sequence[Sequence[Any]], hashes: Sequence[str], *, use_ledger: bool = True, use_held: bool = True
) -> Triage:
    """Sort a chunk by source hash in one pass (no per-chunk dicts: most rows of a touched table
    are settled here). ``use_ledger=False`` (a full refresh) settles nothing; ``use_held=False``
    (a replay) holds nothing."""
    out = Triage()
    for i, (row, h) in enumerate(zip(rows, hashes, strict=True)):
        _key, _updated, _email, _phone, _digest, ledger_source, ledger_payload, held_source, held_dup = row
        if use_ledger and ledger_source == h and ledger_payload is not None:
            out.settled.append(i)
        elif use_held and held_source == h:
            (out.held_duplicates if held_dup else out.still_quarantined).append(i)
        else:
            out.changed.append(i)
    return out
