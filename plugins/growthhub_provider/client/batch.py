"""
Many upserts at once: the bounded, identity-serialised window of rows in flight, and what comes out.

:meth:`GrowthHubClient.upsert_contacts <growthhub_provider.client.GrowthHubClient.upsert_contacts>`
sends each row through :class:`IdentityWindow`; this module knows threads and order, not HTTP.
"""

from __future__ import annotations

import contextlib
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections import Counter
    from collections.abc import Callable, Iterator
    from concurrent.futures import Future

OutcomeStatus = Literal["created", "updated", "rejected", "failed", "skipped"]


@dataclass(frozen=True)
class UpsertOutcome:
    """
    The fate of one row of :meth:`GrowthHubClient.upsert_contacts`, carrying the caller's key.

    ``messages`` holds the API's list for ``rejected`` and the last error for ``failed``.
    """

    key: str
    status: OutcomeStatus
    contact_id: str | None = None
    http_status: int | None = None
    messages: list[str] = field(default_factory=list)
    trace_id: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class BatchStats:
    """Counters of one :meth:`GrowthHubClient.upsert_contacts` call (also logged as one line)."""

    sent: int
    created: int
    updated: int
    rejected: int
    failed: int
    skipped: int
    retried: int
    throttled: int
    elapsed_s: float
    daily_remaining: int | None = None
    """The location's daily quota left when the batch ended, if known."""

    @classmethod
    def from_counts(
        cls, counts: Counter[str], throttled: int, elapsed_s: float, daily_remaining: int | None = None
    ) -> BatchStats:
        """The stats of outcome counts by status, plus ``retried`` (attempts past each row's first)."""
        return cls(
            sent=sum(counts[s] for s in ("created", "updated", "rejected", "failed")),
            created=counts["created"],
            updated=counts["updated"],
            rejected=counts["rejected"],
            failed=counts["failed"],
            skipped=counts["skipped"],
            retried=counts["retried"],
            throttled=throttled,
            elapsed_s=elapsed_s,
            daily_remaining=daily_remaining,
        )

    @property
    def rows_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class BatchRow:
    """One row on its way: the caller's key, the payload to send, the identities it must not share."""

    key: str
    payload: dict[str, Any]
    identities: frozenset[str]


class IdentityWindow:
    """
    Sends rows on a thread pool, at most ``4 * workers`` held at once, whatever the input's size.

    A row sharing an identity with one in flight, or with an earlier row still waiting, waits: rows
    of one person go out one at a time in input order, so the CRM cannot race into duplicates.

    :param workers: sends in flight at once.
    :param send: sends one row and says how it went; runs on the pool's threads.
    """

    def __init__(self, workers: int, send: Callable[[BatchRow], UpsertOutcome]) -> None:
        self._send = send
        self._size = 4 * workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="growthhub")
        self._waiting: list[BatchRow] = []
        self._busy: set[str] = set()
        self._in_flight: dict[Future[UpsertOutcome], BatchRow] = {}
        # Completed futures arrive here: O(1) per row, where wait() re-scans the whole window.
        self._finished: queue.SimpleQueue[Future[UpsertOutcome]] = queue.SimpleQueue()

    def outcomes(self, rows: Iterator[BatchRow]) -> Iterator[UpsertOutcome]:
        """
        Send ``rows`` and yield each outcome as soon as it is known; rows are read only as room frees.

        An exception of ``send`` comes out here; :meth:`close` then stops what is left.
        """
        exhausted = False
        while True:
            exhausted = exhausted or self._fill(rows)
            self._start_ready()
            if not self._in_flight:
                return
            for future in self._completed():
                self._busy.difference_update(self._in_flight.pop(future).identities)
                yield future.result()

    def close(self) -> None:
        """Drop the rows not started yet and wait for those in flight."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _fill(self, rows: Iterator[BatchRow]) -> bool:
        """Read rows until the window is full; ``True`` once ``rows`` is exhausted."""
        while len(self._in_flight) + len(self._waiting) < self._size:
            row = next(rows, None)
            if row is None:
                return True
            self._waiting.append(row)
        return False

    def _start_ready(self) -> None:
        held: set[str] = set()  # identities of earlier waiting rows keep their place in line
        still_waiting = []
        for row in self._waiting:
            if row.identities & self._busy or row.identities & held:
                held |= row.identities
                still_waiting.append(row)
                continue
            self._busy.update(row.identities)
            future = self._executor.submit(self._send, row)
            self._in_flight[future] = row
            future.add_done_callback(self._finished.put)
        self._waiting[:] = still_waiting

    def _completed(self) -> list[Future[UpsertOutcome]]:
        """Block for one finished send, then take every other one already finished."""
        done = [self._finished.get()]
        with contextlib.suppress(queue.Empty):
            while True:
                done.append(self._finished.get_nowait())
        return done
