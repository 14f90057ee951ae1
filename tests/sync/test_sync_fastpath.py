"""The unchanged-row fast path: one-pass sorting by source hash and the prefetching extract."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from growthhub_sync.diff import Triage, triage
from growthhub_sync.extract import NarrowRow, _prefetched


def _row(key: str, *, ledger: str | None = None, payload: str | None = None, held: str | None = None,
         dup_of: str | None = None) -> NarrowRow:  # fmt: skip
    return NarrowRow(key, None, None, None, None, ledger, payload, held, dup_of)


def test_triage_matches_the_ledger_and_quarantine_rules() -> None:
    rows = [
        _row("a", ledger="h0", payload="p"),  # settled
        _row("b", ledger="old", payload="p"),  # changed
        _row("c", ledger="h2", payload=None),  # no ledger row (payload NULL): full path
        _row("d", held="h3"),  # still quarantined
        _row("e", held="h4", dup_of="a"),  # quarantined duplicate
        _row("f", ledger="h5", payload="p", held="h5"),  # the ledger wins over the quarantine
        _row("g", held="other"),  # changed since quarantined
        _row("h"),  # new
    ]
    hashes = [f"h{i}" for i in range(len(rows))]
    assert triage(rows, hashes) == Triage([0, 5], [1, 2, 6, 7], [3], [4])
    # a full refresh settles nothing; a replay holds nothing
    assert triage(rows, hashes, use_ledger=False) == Triage([], [0, 1, 2, 6, 7], [3, 5], [4])
    assert triage(rows, hashes, use_held=False) == Triage([0, 5], [1, 2, 3, 4, 6, 7], [], [])
    with pytest.raises(ValueError):
        triage(rows, hashes[:-1])


def _chunks(n: int, fail_at: int | None = None) -> Iterator[list[int]]:
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("fetch failed")
        yield [i]


def _helpers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "growthhub-extract-prefetch"]


def test_prefetched_yields_every_chunk_in_order() -> None:
    assert list(_prefetched(_chunks(5))) == [[0], [1], [2], [3], [4]]
    assert list(_prefetched(_chunks(0))) == []
    assert not _helpers()


def test_prefetched_reraises_a_fetch_error_and_stops() -> None:
    it = _prefetched(_chunks(5, fail_at=2))
    assert [next(it), next(it)] == [[0], [1]]
    with pytest.raises(RuntimeError, match="fetch failed"):
        next(it)
    assert not _helpers()


def test_prefetched_closed_early_leaves_no_thread_behind() -> None:
    fetched: list[int] = []

    def source() -> Iterator[list[int]]:
        for i in range(100):
            fetched.append(i)
            yield [i]

    it = _prefetched(source())
    assert next(it) == [0]
    it.close()  # what a consumer that raises does to the generator
    assert not _helpers()
    assert len(fetched) <= 3  # at most a chunk or two read ahead, not the whole result
