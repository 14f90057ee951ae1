"""What a sync reports: the outcome of every extracted row, the counts of a batch or run, and the
rows it leaves behind (quarantined, pending) with their reasons.

Every extracted row ends in exactly one outcome (:data:`OUTCOMES`): ``unchanged``, ``created``,
``updated``, ``quarantined`` (quality), ``rejected`` (API 400/422), ``deferred`` (quota or
transient failure: kept pending and picked up first next time) or ``deleted`` (gone from the
warehouse: deleted or tagged in the CRM, :mod:`~growthhub_sync.deletes`). :class:`Summary` checks that
invariant per chunk and per run. Cheap to import (the DAG processor reads the outcome names).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from growthhub_provider.masking import mask_pii
from growthhub_sync.reasons import DUPLICATE_IDENTITY, join_codes

OUTCOMES = ("unchanged", "created", "updated", "quarantined", "rejected", "deferred", "deleted")
RUN_COUNTS = ("extracted", *OUTCOMES)
"""The counts a run row stores: extracted = the sum of the outcomes."""
VERIFY_COUNTS = ("verify_checked", "verify_mismatched")
"""The read-back verification's counts a run row stores beside them (:mod:`growthhub_sync.verify`)."""
_COUNTERS = (
    *RUN_COUNTS, "warnings", "checked", "displaced", "still_quarantined", "upserts", "throttled", "retried"
)  # fmt: skip

# why a row waits in the pending table
CHANGED_OR_GONE = "changed or gone during the run"
NO_OUTCOME = "no outcome"
OVERWRITTEN = "contact overwritten by a row that lost its identity to this one: resend"
RESEND = "sent while a row that lost its identity to it was being sent: resend"
IDENTITY_FREED = "the row it lost its identity to gave it up: decide again"
LEFTOVERS = (OVERWRITTEN, RESEND, IDENTITY_FREED)
"""Pending reasons a run's finalize settles once every batch of the run is done."""

_DUPLICATE_ERROR = re.compile(r"^duplicate identity of (.+)$")


class SyncInvariantError(RuntimeError):
    """extracted != unchanged + created + updated + quarantined + rejected + deferred + deleted."""


@dataclass(frozen=True)
class QuarantineRow:
    """A row that may not be sent as it is, and why (a quarantine table row, less its bookkeeping)."""

    source_key: str
    stage: Literal["quality", "api"]
    errors: list[str]
    """Human text: the checks' reasons with the offending value, or GrowthHub's messages."""
    codes: tuple[str, ...]
    """Reason codes (:mod:`growthhub_sync.reasons`), the most telling first."""
    payload: dict[str, Any] | None
    source_hash: str | None
    """Source hash of the failing row: the same row in a later run stays quarantined unchecked."""
    http_status: int | None = None
    duplicate_of: str | None = None

    def columns(self) -> dict[str, Any]:
        """The row's values by quarantine table column."""
        values = asdict(self)
        values["reason_codes"] = join_codes(values.pop("codes"))
        return values

    @classmethod
    def duplicate(
        cls, key: str, winner: str, payload: dict[str, Any] | None, source_hash: str | None
    ) -> QuarantineRow:
        """A row that lost its email or phone to ``winner``."""
        return cls(
            key,
            "quality",
            [f"duplicate identity of {winner}"],
            (DUPLICATE_IDENTITY,),
            payload,
            source_hash,
            duplicate_of=winner,
        )


def duplicate_winner(error: str) -> str | None:
    """The winner's key named by a duplicate's error text, else ``None``."""
    match = _DUPLICATE_ERROR.match(error)
    return match.group(1) if match else None


@dataclass(frozen=True)
class SyncedRow:
    """A row the CRM accepted: what the ledger records."""

    source_key: str
    contact_id: str | None
    payload_hash: str
    source_hash: str


def mask_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A payload fit for logs and XCom: email and phone masked."""
    out = dict(payload)
    for name in ("email", "phone"):
        if out.get(name):
            out[name] = mask_pii(str(out[name]))
    return out


@dataclass
class Summary:
    """Counts of one chunk, batch or run; small enough for XCom (:meth:`as_dict`)."""

    extracted: int = 0
    unchanged: int = 0
    created: int = 0
    updated: int = 0
    quarantined: int = 0
    rejected: int = 0
    deferred: int = 0
    deleted: int = 0
    """Rows deleted in the warehouse whose contact was deleted (or tagged) in the CRM."""
    warnings: int = 0
    checked: int = 0
    """Rows that went through the GX suite (the others were settled by their hashes)."""
    displaced: int = 0
    """Rows synced earlier (this run or before) whose email or phone a newer row took: now
    quarantined as its duplicates. Not an outcome of this run's rows: outside the invariant."""
    still_quarantined: int = 0
    """Quarantined rows unchanged since they were quarantined (not checked or sent again); their
    reasons were counted by the run that quarantined them."""
    upserts: int = 0
    """Rows the client sent (each counted once, whatever its retries)."""
    throttled: int = 0
    """Responses 429 (rate limited)."""
    retried: int = 0
    """Requests sent again after a transient failure (429, 5xx, timeout)."""
    daily_remaining: int | None = None
    """The location's daily request quota left after the last send, if known."""
    reasons: Counter[str] = field(default_factory=Counter)
    """Reason codes (:mod:`growthhub_sync.reasons`) → rows this run quarantined, had rejected or
    displaced; a row counts once under each of its codes."""
    messages: Counter[str] = field(default_factory=Counter)
    """Most frequent API rejection messages → rows."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Masked sample payloads of a dry run."""
    max_samples: int = field(default=5, repr=False)

    @property
    def accounted(self) -> int:
        return sum(getattr(self, o) for o in OUTCOMES)

    @property
    def invariant_ok(self) -> bool:
        return self.extracted == self.accounted

    def count(self, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)

    def add_sample(self, key: str, payload: Mapping[str, Any]) -> None:
        if len(self.samples) < self.max_samples:
            self.samples.append({"key": key, "payload": mask_payload(payload)})

    def add(self, other: Summary | Mapping[str, Any]) -> None:
        data = other.as_dict() if isinstance(other, Summary) else other
        for name in _COUNTERS:
            self.count(name, int(data.get(name, 0)))
        # batches run in parallel: the lowest quota figure is the latest
        remaining = [r for r in (self.daily_remaining, data.get("daily_remaining")) if r is not None]
        self.daily_remaining = min(remaining, default=None)
        self.reasons.update(data.get("reasons", {}))
        self.messages.update(data.get("messages", {}))
        self.samples.extend(data.get("samples", [])[: max(0, self.max_samples - len(self.samples))])

    def check_invariant(self, what: str) -> None:
        if not self.invariant_ok:
            raise SyncInvariantError(
                f"{what} accounted for {self.accounted} of {self.extracted} rows: {self.as_dict()}"
            )

    @property
    def failed_rows(self) -> int:
        """Rows that failed in this run: rows still in quarantine and unchanged since were alerted
        on when they first failed."""
        return self.quarantined + self.rejected + self.displaced - self.still_quarantined

    @property
    def reject_rate(self) -> float:
        return self.failed_rows / self.extracted if self.extracted else 0.0

    def outcome_counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in RUN_COUNTS}

    def counts_line(self) -> str:
        return ", ".join(f"{k} {getattr(self, k)}" for k in RUN_COUNTS)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.outcome_counts(),
            "warnings": self.warnings,
            "checked": self.checked,
            "displaced": self.displaced,
            "still_quarantined": self.still_quarantined,
            "upserts": self.upserts,
            "throttled": self.throttled,
            "retried": self.retried,
            "daily_remaining": self.daily_remaining,
            "reasons": dict(self.reasons.most_common()),
            "messages": dict(self.messages.most_common(10)),
            "samples": self.samples,
        }
