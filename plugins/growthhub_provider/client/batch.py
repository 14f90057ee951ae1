"""
Many upserts at once: the bounded, identity-serialised window of rows in flight, and what comes out.

:meth:`GrowthHubClient.upsert_contacts <growthhub_provider.client.GrowthHubClient.upsert_contacts>`
sends each row through :class:`IdentityWindow`; this module knows threads and order, not HTTP.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

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
    retried_by_cause: dict[str, int]
    """``retried`` by cause: ``{"429": 200, "503": 100, "timeout": 12}``."""
    daily_remaining: int | None = None
    """The location's daily quota left when the batch ended, if known."""

    @classmethod
    def from_counts(
        cls,
        counts: Counter[str],
        throttled: int,
        elapsed_s: float,
        retried_by_cause: dict[str, int],
        daily_remaining: int | None = None,
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
            retried_by_cause=retried_by_cause,
            daily_remaining=daily_remaining,
        )

    @property
    def rows_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary_line(self) -> str:
        """The batch's one INFO line: counts, pace, the quota left and the retries by cause."""
        return (
            f"GrowthHub batch: sent={self.sent} created={self.created} updated={self.updated} "
            f"rejected={self.rejected} failed={self.failed} skipped={self.skipped} "
            f"retried={self.retried} 429s={self.throttled} elapsed={self.elapsed_s:.1f}s "
            f"rows/s={self.rows_per_s:.1f} daily_remaining={self.daily_remaining}"
            + by_cause(f"; retried {self.retried} requests", self.retried_by_cause)
        )


def by_cause(head: str, causes: Mapping[str, int]) -> str:
    """``"; retried 312 requests: 429 x 200, 503 x 112"``, or nothing when there is no cause."""
    if not causes:
        return ""
    return f"{head}: " + ", ".join(f"{cause} x {n}" for cause, n in Counter(causes).most_common())


@dataclass
class BatchRow:
    """One row on its way: the caller's key, the payload to send, the identities it must not share."""

    key: str
    payload: dict[str, Any]
    identities: frozenset[str]


_Finished = tuple[BatchRow, "UpsertOutcome | None", "BaseException | None"]
"""A row back from a worker thread: its outcome, or the exception its send raised."""


class IdentityWindow:
    """
    Sends rows on worker threads, at most ``4 * workers`` held at once, whatever the input's size.

    A row sharing an identity with one in flight, or with an earlier row still waiting, waits: rows
    of one person go out one at a time in input order, so the CRM cannot race into duplicates.

    The first row goes out alone, and the window opens once its outcome is known: a bad token or
    an unaccepted ``Version`` then costs one request, not ``workers`` of them.

    Its own threads on two queues rather than a ``ThreadPoolExecutor``: a future per row (its
    condition, callbacks and the pool's semaphore) cost more CPU than the row's bookkeeping here.

    :param workers: sends in flight at once.
    :param send: sends one row and says how it went; runs on the window's threads.
    """

    def __init__(self, workers: int, send: Callable[[BatchRow], UpsertOutcome]) -> None:
        self._send = send
        self._workers = workers
        self._size = 4 * workers
        self._threads: list[threading.Thread] = []
        self._waiting: list[BatchRow] = []
        self._busy: set[str] = set()
        self._in_flight = 0
        self._opened = False
        """The first outcome is known: rows may go out ``workers`` at a time."""
        self._closing = False
        """Set by :meth:`close`: rows still queued are dropped, not sent."""
        self._to_send: queue.SimpleQueue[BatchRow | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[_Finished] = queue.SimpleQueue()

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
            for row, outcome, error in self._completed():
                self._in_flight -= 1
                self._busy.difference_update(row.identities)
                if error is not None:
                    raise error
                assert outcome is not None  # a send either returned an outcome or raised
                self._opened = True
                yield outcome

    def close(self) -> None:
        """Drop the rows not started yet and wait for those in flight."""
        self._closing = True
        for _ in self._threads:
            self._to_send.put(None)
        for thread in self._threads:
            thread.join()

    def _fill(self, rows: Iterator[BatchRow]) -> bool:
        """Read rows until the window is full; ``True`` once ``rows`` is exhausted."""
        while self._in_flight + len(self._waiting) < self._size:
            row = next(rows, None)
            if row is None:
                return True
            self._waiting.append(row)
        return False

    def _start_ready(self) -> None:
        held: set[str] = set()  # identities of earlier waiting rows keep their place in line
        still_waiting = []
        probing = not self._opened and self._in_flight > 0
        for row in self._waiting:
            if probing or row.identities & self._busy or row.identities & held:
                held |= row.identities
                still_waiting.append(row)
                continue
            self._busy.update(row.identities)
            self._in_flight += 1
            if len(self._threads) < min(self._in_flight, self._workers):
                self._start_thread()
            self._to_send.put(row)
            probing = not self._opened
        self._waiting[:] = still_waiting

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"growthhub_{len(self._threads)}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _work(self) -> None:
        """A worker thread: send queued rows until told to stop (``None``)."""
        while (row := self._to_send.get()) is not None:
            if self._closing:
                continue
            try:
                self._finished.put((row, self._send(row), None))
            except BaseException as error:  # handed to the caller of outcomes()
                self._finished.put((row, None, error))

    def _completed(self) -> list[_Finished]:
        """Block for one finished send, then take every other one already finished."""
        done = [self._finished.get()]
        with contextlib.suppress(queue.Empty):
            while True:
                done.append(self._finished.get_nowait())
        return done
