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
from hashlib import blake2b
from typing import Any

from growthhub_sync.extract import Narrow


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


def sorted_by_source(
    rows: Sequence[Sequence[Any]], hashes: Sequence[str], *, use_ledger: bool = True, use_held: bool = True
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Sort a chunk of narrow rows (:class:`Narrow`) by source hash, in one pass, into row indexes:

    * *settled*: the ledger holds this exact source hash (unchanged since it was synced);
    * *todo*: the full path (map, check, send);
    * *still_bad* / *dups*: unchanged since it was quarantined (*dups*: as a duplicate).

    ``use_ledger=False`` (a full refresh) settles nothing; ``use_held=False`` (a replay) holds nothing.
    """
    ls, lp, hs, hd = Narrow.LEDGER_SOURCE, Narrow.LEDGER_PAYLOAD, Narrow.HELD_SOURCE, Narrow.HELD_DUPLICATE_OF
    settled: list[int] = []
    todo: list[int] = []
    still_bad: list[int] = []
    dups: list[int] = []
    for i, (r, h) in enumerate(zip(rows, hashes, strict=True)):
        if use_ledger and r[ls] == h and r[lp] is not None:
            settled.append(i)
        elif use_held and r[hs] == h:
            (dups if r[hd] else still_bad).append(i)
        else:
            todo.append(i)
    return settled, todo, still_bad, dups
