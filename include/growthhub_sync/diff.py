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


def unchanged_by_source(
    keys: Sequence[str], hashes: Sequence[str], ledger: Mapping[str, tuple[str | None, str]]
) -> list[bool]:
    """Per row: True when the ledger holds this exact source hash."""
    return [(entry := ledger.get(k)) is not None and entry[0] == h for k, h in zip(keys, hashes, strict=True)]
