"""Read-back verification: catch updates GrowthHub answered 200 to but did not store.

GrowthHub users report updates that succeed yet leave a field unchanged (gender on update, a
phone when the email matched another contact, a secondary email wiped). After a run's batches,
:func:`verify_run` reads a sample of the contacts the run created or updated back
(``GET /contacts/{id}``, through the location's client: its rate limiter, retries and quota) and
compares every field that was sent with what GrowthHub holds.

- **Which contacts**: the ledger rows this run wrote (created or updated, ``last_run_id``), ranked
  by a hash of (run, location, key) and the lowest taken: a uniform random sample, the same one
  whatever the shards, batches or a retried finalize, and another one every run.
- **How many**: ``verify.sample`` of them, at least one when anything was sent, at most
  ``verify.max_rows`` (:func:`sample_size`); ``sample: 0`` turns verification off.
- **Against what**: the payload that was sent, rebuilt by mapping the current source row the way
  the batch did; the ledger's payload hash proves it is the one sent (a row changed since, or sent
  without a field whose check only warned and still unmatched, is skipped, never a false alarm).
- **Compared how**: after the API's own normalisation (:func:`differences`): emails
  case-insensitive, phones by digits, dates by day, tags and custom fields as GrowthHub echoes them
  (tags merged by workflows are no difference; every sent tag must be there).

The result (:class:`Verification`) goes into the run row (``verify_checked``,
``verify_mismatched`` and ``details.verify`` with masked examples per field); a mismatch never
fails the sync of a row, it alerts (``verify.threshold``).
"""

from __future__ import annotations

import heapq
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import blake2b
from itertools import combinations
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import select

from growthhub_provider.masking import mask_pii
from growthhub_sync.diff import payload_hash
from growthhub_sync.extract import Source
from growthhub_sync.fields import PAYLOAD_KEYS_OF_CHECK
from growthhub_sync.mapping import Mapper
from growthhub_sync.state import state_tables
from growthhub_sync.upsert import UpserterSource, resolve_upserter

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine, Row

    from growthhub_sync.config import LocationConfig, SyncConfig, VerifyConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

EXAMPLES = 3
"""Masked examples kept per differing field."""
READERS = 4
"""Reads in flight at once: hides the round trips; the location's limiter sets the pace."""
CONTACT = "contact"
"""The pseudo-field of a contact GrowthHub no longer finds (404)."""
_SHOWN = frozenset(("gender", "country", "timezone", "dnd", "source", "tags", "contact"))
"""Fields whose values are not personal data: examples show them as they are."""
_MAX_DROPPED = 3  # warn-only fields a sent payload may have lost: subsets tried to match its hash


class Reader(Protocol):
    """What verification needs of GrowthHub (the hook)."""

    def get_contact(self, contact_id: str) -> dict[str, Any]: ...


@dataclass
class Verification:
    """What one run's read-back found for one location (small: it goes to XCom and the run row)."""

    sent: int = 0
    """Contacts the run created or updated (the population sampled)."""
    sample: int = 0
    checked: int = 0
    """Contacts read back and compared."""
    mismatched: int = 0
    """Checked contacts with at least one field unlike what was sent."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Sampled contacts not compared, by why: ``changed_since_sent``, ``unreadable``, ``no_reader``,
    ``daily_quota_spent``."""
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Field → ``{"count", "examples": [{"key", "sent", "found"}]}`` (values masked)."""
    daily_remaining: int | None = None
    """The location's daily quota left after the reads (they spend it too), if the client knows."""

    def skip(self, why: str, n: int = 1) -> None:
        if n:
            self.skipped[why] = self.skipped.get(why, 0) + n

    def record(self, key: str, diffs: Sequence[tuple[str, Any, Any]]) -> None:
        """One contact's differences (none: it matched)."""
        self.checked += 1
        self.mismatched += bool(diffs)
        for name, sent, found in diffs:
            entry = self.fields.setdefault(name, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < EXAMPLES:
                entry["examples"].append(
                    {"key": key, "sent": _masked(name, sent), "found": _masked(name, found)}
                )

    @property
    def mismatch_rate(self) -> float:
        return self.mismatched / self.checked if self.checked else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "sample": self.sample,
            "checked": self.checked,
            "mismatched": self.mismatched,
            "skipped": dict(self.skipped),
            "fields": dict(sorted(self.fields.items(), key=lambda kv: -kv[1]["count"])),
        }

    def line(self) -> str:
        """``checked 5, mismatched 2 (gender 2)``: the log's words."""
        top = ", ".join(f"{name} {entry['count']}" for name, entry in self.as_dict()["fields"].items())
        return f"checked {self.checked}, mismatched {self.mismatched}" + (f" ({top})" if top else "")


def run_counts(verified: Verification | None) -> dict[str, int]:
    """The run row's ``verify_*`` columns (0 when nothing was verified)."""
    v = verified or Verification()
    return {"verify_checked": v.checked, "verify_mismatched": v.mismatched}


def breached(verified: Verification | None, cfg: VerifyConfig) -> bool:
    """Whether the share of checked contacts that differ is over ``verify.threshold`` (alert)."""
    return verified is not None and verified.mismatched > 0 and verified.mismatch_rate > cfg.threshold


def sample_size(sent: int, cfg: VerifyConfig) -> int:
    """Contacts to read back of ``sent``: ``sample`` of them rounded up (so one when anything was
    sent), at most ``max_rows``; none when ``sample`` is 0."""
    if sent <= 0 or cfg.sample <= 0:
        return 0
    return min(cfg.max_rows, max(1, math.ceil(cfg.sample * sent)))


def pick(rows: Iterable[T], n: int, seed: str, key: Callable[[T], str]) -> list[T]:
    """The ``n`` rows whose ``key`` ranks lowest by a hash of ``seed`` and the key, lowest first: a
    uniform sample that does not depend on the order the rows come in (so not on shards or
    batches); the lowest ``n`` of a bigger pick are the pick of ``n``."""
    prefix = f"{seed}\0".encode()
    return heapq.nsmallest(n, rows, key=lambda r: blake2b(prefix + key(r).encode(), digest_size=8).digest())


def verify_run(
    config: SyncConfig,
    location: LocationConfig,
    engine: Engine,
    run_id: str,
    reader: UpserterSource = None,
) -> Verification | None:
    """Read back a sample of the contacts run ``run_id`` created or updated at ``location`` and
    compare them with what was sent; ``None`` when verification is off (``sample: 0``). A dry run
    sent nothing: not for it.

    Never raises for what GrowthHub answers: an unreadable contact is counted as skipped.
    """
    if config.verify.sample <= 0:
        return None
    config = config.for_location(location)
    sent, chosen = _sampled(config, location, engine, run_id)
    out = Verification(sent=sent, sample=len(chosen))
    if not chosen:
        return out
    client = resolve_upserter(reader, location)
    if not hasattr(client, "get_contact"):  # a destination that cannot read (a test's fake)
        out.skip("no_reader", len(chosen))
        return out
    expected = _expected_payloads(config, location, engine, chosen)
    out.skip("changed_since_sent", len(chosen) - len(expected))
    readable = [(key, contact_id) for key, (contact_id, _) in chosen.items() if key in expected]
    readable = _within_daily_quota(client, readable, config.quota.daily_reserve, out)
    answers = _read_all(client, [contact_id for _, contact_id in readable])  # type: ignore[arg-type]
    for (key, contact_id), found in zip(readable, answers, strict=True):
        if found is _SPENT:
            out.skip("daily_quota_spent")
        elif found is None:
            out.skip("unreadable")
        elif found is _GONE:
            out.record(key, [(CONTACT, contact_id, None)])
        else:
            out.record(key, differences(expected[key], found))
    out.daily_remaining = getattr(client, "daily_remaining", None)
    log.info("verify %s: %d of %d sent contacts read back: %s", location.name, len(chosen), sent, out.line())
    return out


def _sampled(
    config: SyncConfig, location: LocationConfig, engine: Engine, run_id: str
) -> tuple[int, dict[str, tuple[str, str]]]:
    """(contacts the run sent, the sampled ones: key → (contact id, payload hash))."""
    led = state_tables(config.state).ledger
    stmt = select(led.c.source_key, led.c.contact_id, led.c.payload_hash).where(
        led.c.location == location.name,
        led.c.last_run_id == run_id,
        led.c.payload_hash != "",  # invalidated: another row's values may be there, sent again next run
        led.c.contact_id.is_not(None),
    )
    counted = 0

    def count(rows: Iterable[Row[Any]]) -> Iterator[Row[Any]]:
        nonlocal counted
        for row in rows:
            counted += 1
            yield row

    with engine.connect() as conn:  # streamed: a first load's million keys are never all in memory
        rows = conn.execution_options(yield_per=10_000).execute(stmt)
        lowest = pick(count(rows), config.verify.max_rows, f"{run_id}\0{location.name}", lambda r: r[0])
    chosen = lowest[: sample_size(counted, config.verify)]
    return counted, {key: (contact_id, h) for key, contact_id, h in chosen}


def _expected_payloads(
    config: SyncConfig, location: LocationConfig, engine: Engine, chosen: Mapping[str, tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """The payload each chosen row was sent with: its current source row mapped as the batch did,
    if its hash is the ledger's (also without fields whose check only warns: the batch dropped
    those). Rows changed since they were sent are left out."""
    source = Source(config, location, state_tables(config.state), engine.dialect.name)
    with engine.connect() as conn:
        rows = list(conn.execute(source.by_keys(sorted(chosen), full=True)))
    if not rows:
        return {}
    batch = Mapper(config, source.columns).map(rows, location.location_id)
    warn_only = [k for c, ks in PAYLOAD_KEYS_OF_CHECK.items() if c not in config.quality.errors for k in ks]
    out = {}
    for key, payload in zip(batch.keys, batch.payloads, strict=True):
        if (sent := _as_sent(payload, chosen[key][1], warn_only)) is not None:
            out[key] = sent
    return out


def _as_sent(payload: dict[str, Any], sent_hash: str, warn_only: Sequence[str]) -> dict[str, Any] | None:
    """``payload``, or it less some warn-only fields, whose hash is ``sent_hash``; else ``None``."""
    present = [k for k in warn_only if k in payload]
    for n in range(min(len(present), _MAX_DROPPED) + 1):
        for dropped in combinations(present, n):
            candidate = {k: v for k, v in payload.items() if k not in dropped}
            if payload_hash(candidate) == sent_hash:
                return candidate
    return None


def _within_daily_quota(client: Any, readable: list[T], reserve: int, out: Verification) -> list[T]:
    """As many of ``readable`` as the location's known daily quota still allows above ``reserve``:
    reads spend it too, and a day spent on sending (a backlog draining) leaves none; the others are
    skipped (``daily_quota_spent``), not read into a 429."""
    left = getattr(client, "daily_remaining", None)
    if left is None or left - reserve >= len(readable):
        return readable
    allowed = max(left - reserve, 0)
    out.skip("daily_quota_spent", len(readable) - allowed)
    return readable[:allowed]


_GONE: dict[str, Any] = {}
"""The answer for a contact GrowthHub does not find (404)."""
_SPENT: dict[str, Any] = {}
"""The answer when the location's daily quota ran out before the read (another client spent it)."""


def _read_all(client: Reader, contact_ids: Sequence[str]) -> list[dict[str, Any] | None]:
    """:func:`_read` of each contact, in order: the first alone (it builds the hook's client and
    token once), the rest :data:`READERS` at a time."""
    if not contact_ids:
        return []
    first = _read(client, contact_ids[0])
    with ThreadPoolExecutor(READERS, thread_name_prefix="growthhub-verify") as pool:
        return [first, *pool.map(lambda contact_id: _read(client, contact_id), contact_ids[1:])]


def _read(client: Reader, contact_id: str) -> dict[str, Any] | None:
    """The contact, :data:`_GONE` when GrowthHub does not find it, :data:`_SPENT` when the daily
    quota is, ``None`` when it could not be read (after the client's retries; an auth error too:
    the run's sending is done)."""
    from growthhub_provider.client import GrowthHubDailyQuotaSpent, GrowthHubError, GrowthHubNotFound

    try:
        return client.get_contact(contact_id)
    except GrowthHubNotFound:
        return _GONE
    except GrowthHubDailyQuotaSpent:
        return _SPENT
    except GrowthHubError as exc:
        log.warning("verify: contact not read (%s)", mask_pii(f"{type(exc).__name__}: {exc}")[:200])
        return None


# -- comparison ----------------------------------------------------------------------------------


def differences(sent: Mapping[str, Any], found: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, sent, found)`` for every sent field GrowthHub does not hold as sent, compared the
    way the API echoes it."""
    out: list[tuple[str, Any, Any]] = []
    for key, value in sent.items():
        if key == "locationId":
            continue
        compare = _COMPARE.get(key)
        if compare is not None:
            out.extend(compare(key, value, found))
        elif _plain(value) != _plain(found.get(key)):
            out.append((key, value, found.get(key)))
    return out


def _plain(value: Any) -> Any:
    """Text stripped, blank as NULL (the API stores it so); other values as they are."""
    if isinstance(value, str):
        return value.strip() or None
    return value


def _by(normal: Callable[[Any], Any]) -> Callable[[str, Any, Mapping[str, Any]], list[tuple[str, Any, Any]]]:
    def compare(key: str, sent: Any, found: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        got = found.get(key)
        return [] if normal(_plain(sent)) == normal(_plain(got)) else [(key, sent, got)]

    return compare


def _lower(v: Any) -> Any:
    return v.lower() if isinstance(v, str) else v


def _digits(v: Any) -> Any:
    return re.sub(r"\D", "", v) if isinstance(v, str) else v


def _day(v: Any) -> Any:
    """A date as ``YYYY-MM-DD`` whether echoed as a date, an ISO timestamp or epoch milliseconds."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return datetime.fromtimestamp(v / 1000, UTC).date().isoformat()
    return v[:10] if isinstance(v, str) else v


def _tags(key: str, sent: Any, found: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Every sent tag is there (GrowthHub stores them lower-case; a workflow may add more); an
    empty list sent (clear) leaves none."""
    held = [str(t).strip().lower() for t in found.get(key) or []]
    wanted = [str(t).strip().lower() for t in sent or []]
    ok = set(wanted) <= set(held) if wanted else not held
    return [] if ok else [(key, sent, found.get(key))]


def _custom_fields(key: str, sent: Any, found: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """GrowthHub echoes ``[{"id", "value"}]``: a field sent by id must hold its value; one sent by
    key (the echo names no keys) must have its value among the contact's."""
    echoed = found.get(key) or []
    by_id = {f.get("id"): f.get("value") for f in echoed} if isinstance(echoed, list) else dict(echoed)
    out = []
    for item in sent or []:
        want = _plain(item.get("field_value"))
        if item.get("id"):
            got = _plain(by_id.get(item["id"]))
            if got != want:
                out.append((f"{key}.{item['id']}", want, got))
        elif want is not None and want not in [_plain(v) for v in by_id.values()]:
            out.append((f"{key}.{item.get('key')}", want, None))
    return out


def _dnd(key: str, sent: Any, found: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The status of every channel sent (the API merges channels: others may be there)."""
    held = found.get(key) or {}
    out = []
    for channel, setting in (sent or {}).items():
        want, got = (setting or {}).get("status"), (held.get(channel) or {}).get("status")
        if want != got:
            out.append((f"{key}.{channel}", want, got))
    return out


_COMPARE: dict[str, Callable[[str, Any, Mapping[str, Any]], list[tuple[str, Any, Any]]]] = {
    "email": _by(_lower),
    "phone": _by(_digits),
    "timezone": _by(_lower),
    "country": _by(_lower),
    "dateOfBirth": _by(_day),
    "dnd": _by(bool),
    "tags": _tags,
    "customFields": _custom_fields,
    "dndSettings": _dnd,
    "inboundDndSettings": _dnd,
}


def _masked(name: str, value: Any) -> Any:
    """An example's value fit for the run row and the note: emails and phones masked, other
    personal data (names, addresses, dates) cut to a first character; categories as they are."""
    if value is None or isinstance(value, bool):
        return value
    if name.split(".")[0] in _SHOWN or name.startswith(("dndSettings", "inboundDndSettings")):
        return value
    text = mask_pii(str(value))
    if text != str(value):
        return text
    return f"{text[:1]}***" if text else text
