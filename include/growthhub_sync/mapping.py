"""Map: a warehouse row becomes an Upsert Contact payload plus the check columns of its batch.

Each standard field is read, normalised and put as :mod:`growthhub_sync.fields` declares; the
normalisers' verdicts land in columns of a DataFrame on which the GX suite of
:mod:`growthhub_sync.checks` asserts, so GX stays the place where checks are declared and
reported. Blank strings count as NULL, and NULL follows the null policy of the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from growthhub_sync.fields import FIELD, PAYLOAD_KEYS_OF_CHECK, FieldSpec, Verdict
from growthhub_sync.normalise import (
    NANP_DIGITS,
    json_value,
    normalise_email,
    normalise_phone,
    read_bool,
    read_text,
    split_tags,
)

if TYPE_CHECKING:
    import pandas as pd

    from growthhub_sync.config import SyncConfig


@dataclass
class MappedBatch:
    """A batch after mapping: payloads, check columns (the GX input) and normaliser verdicts."""

    rows: Sequence[Sequence[Any]]
    keys: list[str]
    updated_at: list[Any]
    payloads: list[dict[str, Any]]
    frame: pd.DataFrame
    reasons: list[dict[str, str]]
    """Per row: check name → the normaliser's reason, for checks it already decided."""
    fields_of_check: dict[str, list[str]] = field(default_factory=dict)
    """Check name → payload keys to drop when the check only warns."""


class _Draft:
    """The batch being mapped: what the steps of :meth:`Mapper.map` fill in, row by row."""

    def __init__(self, rows: Sequence[Sequence[Any]], location_id: str) -> None:
        n = len(rows)
        self.rows = rows
        self.cols: dict[str, list[Any]] = {}
        self.reasons: list[dict[str, str]] = [{} for _ in range(n)]
        self.payloads: list[dict[str, Any]] = [{"locationId": location_id} for _ in range(n)]
        # payload keys to send as null ("clear" policy); set last, so they stay last in the payload
        self.nulls: list[list[str]] = [[] for _ in range(n)]

    def column(self, name: str) -> list[Any]:
        """A check column of the frame, created (all NULL) on first use."""
        return self.cols.setdefault(name, [None] * len(self.rows))

    def put(self, key: str, values: Sequence[Any], on_null: str) -> None:
        clear = on_null == "clear"
        for payload, nulls, v in zip(self.payloads, self.nulls, values, strict=True):
            if v is not None:
                payload[key] = v
            elif clear:
                nulls.append(key)


class Mapper:
    """Maps rows (tuples in ``columns`` order) for one config; build once, reuse per batch."""

    def __init__(self, config: SyncConfig, columns: Sequence[str]) -> None:
        self.config = config
        self.idx = {c: i for i, c in enumerate(columns)}
        self.key_i = self.idx[config.source.key_column]
        self.upd_i = self.idx[config.source.updated_at_column]
        self.region = config.quality.default_region
        m = config.mapping
        self.policy = m.null_policy
        self.fields = {
            name: (self.idx[fm.column], fm.on_null or m.null_policy) for name, fm in m.fields.items()
        }
        self._email_i = self.fields["email"][0] if "email" in self.fields else None
        self._phone_i = self.fields["phone"][0] if "phone" in self.fields else None

    def contact(self, row: Sequence[Any]) -> tuple[Any, Any]:
        """The raw ``(email, phone)`` of a full row."""
        return (
            row[self._email_i] if self._email_i is not None else None,
            row[self._phone_i] if self._phone_i is not None else None,
        )

    def identities(self, contacts: Sequence[tuple[Any, Any]]) -> list[list[tuple[str, str]]]:
        """Normalised ``("email", ...)``/``("phone", ...)`` identities per raw ``(email, phone)``."""
        out = []
        for email, phone in contacts:
            ids = []
            if (v := read_text(email)) and (n := normalise_email(v)[0]):
                ids.append(("email", n.lower()))
            if (v := read_text(phone)) and (n := normalise_phone(v, self.region)[0]):
                ids.append(("phone", n))
            out.append(ids)
        return out

    @staticmethod
    def cheap_ids(email: Any, phone: Any) -> set[tuple[str, str]] | None:
        """Keys that are equal whenever two rows' identities are (``None``: no cheap key exists).

        An ASCII email's normalised form is its lower-cased self; a phone written with digits
        and punctuation only ends with its national number, so its last 4 digits must agree.
        """
        out: set[tuple[str, str]] = set()
        if email is not None:
            v = str(email).strip()
            if not v.isascii():
                return None
            out.add(("email", v.lower()))
        if phone is not None:
            v = str(phone).strip()
            tail = v[-4:]
            if not NANP_DIGITS.match(v):
                return None
            out.add(("phone", tail if tail.isdigit() else "".join(ch for ch in v if "0" <= ch <= "9")[-4:]))
        return out

    def map(self, rows: Sequence[Sequence[Any]], location_id: str) -> MappedBatch:
        """Payloads and check columns of ``rows`` for ``location_id``."""
        import pandas as pd

        draft = _Draft(rows, location_id)
        today = datetime.now(UTC).date()
        for name, (ci, on_null) in self.fields.items():
            self._standard(draft, FIELD[name], ci, on_null, today)
        self._custom_fields(draft)
        self._tags(draft)
        self._dnd(draft)
        self._identity_and_nulls(draft)
        return MappedBatch(
            rows=rows,
            keys=[str(r[self.key_i]) for r in rows],
            updated_at=[r[self.upd_i] for r in rows],
            payloads=draft.payloads,
            frame=pd.DataFrame(draft.cols, dtype=object),
            reasons=draft.reasons,
            fields_of_check={check: list(keys) for check, keys in PAYLOAD_KEYS_OF_CHECK.items()},
        )

    def _standard(self, draft: _Draft, spec: FieldSpec, ci: int, on_null: str, today: date) -> None:
        """One standard field for the whole batch, as its registry entry says."""
        rows = draft.rows
        if spec.read == "text":
            raw = [read_text(r[ci]) for r in rows]
        elif spec.read == "bool":
            raw = [read_bool(r[ci]) for r in rows]
        else:
            raw = [r[ci] for r in rows]
        if spec.normalise is not None:
            self._verdicts(draft, spec, raw, on_null, spec.normaliser(self.region, today))
            return
        if spec.canonical is not None:  # GX itself checks the values (a small set from the config)
            values = draft.column(spec.key)
            canonical = spec.canonical
            values[:] = [canonical(v) if v is not None else None for v in raw]
            raw = values
        draft.put(spec.key, raw, on_null)

    @staticmethod
    def _verdicts(
        draft: _Draft, spec: FieldSpec, raw: list[Any], on_null: str, normalise: Callable[[Any], Verdict]
    ) -> None:
        """Normalised values into the payloads, verdicts into ``<key>``/``<key>_ok`` and reasons."""
        key = spec.key
        values, oks = draft.column(key), draft.column(f"{key}_ok")
        payloads, reasons, nulls = draft.payloads, draft.reasons, draft.nulls
        clear = on_null == "clear"
        for i, v in enumerate(raw):
            if v is None:
                if clear:
                    nulls[i].append(key)
                continue
            if isinstance(v, str) and not v.strip():
                continue  # blank text of a date column: neither sent nor cleared, as released
            value, err = normalise(v)
            values[i], oks[i] = value, err is None
            if err is not None:
                reasons[i][key] = err  # a bad value is never "null": it does not clear the CRM
            elif value is not None:
                payloads[i][key] = value
            elif clear:
                nulls[i].append(key)

    def _custom_fields(self, draft: _Draft) -> None:
        for cf in self.config.mapping.custom_fields:
            ci = self.idx[cf.column]
            addr = {"key": cf.key} if cf.key else {"id": cf.id}
            on_null = cf.on_null or self.policy
            for payload, r in zip(draft.payloads, draft.rows, strict=True):
                v = json_value(r[ci])
                if v is not None or on_null == "clear":
                    payload.setdefault("customFields", []).append({**addr, "field_value": v})

    def _tags(self, draft: _Draft) -> None:
        """Tags overwrite the contact's tags: ``clear`` sends an empty list."""
        tags_map = self.config.mapping.tags
        if not tags_map:
            return
        ci = self.idx[tags_map.column]
        clear = (tags_map.on_null or self.policy) == "clear"
        for payload, r in zip(draft.payloads, draft.rows, strict=True):
            tags = split_tags(r[ci], tags_map.format, tags_map.delimiter) if r[ci] is not None else None
            if tags is not None:
                payload["tags"] = tags
            elif clear:
                payload["tags"] = []

    def _dnd(self, draft: _Draft) -> None:
        """dndSettings per channel and inboundDndSettings; GX checks their statuses."""
        m = self.config.mapping
        for channel, col in m.dnd_settings.items():
            ci = self.idx[col]
            values = draft.column(f"dnd_{channel}")
            for i, r in enumerate(draft.rows):
                v = read_text(r[ci])
                if v is not None:
                    values[i] = v.lower()
                    draft.payloads[i].setdefault("dndSettings", {})[channel] = {"status": v.lower()}
        if m.inbound_dnd:
            ci = self.idx[m.inbound_dnd]
            values = draft.column("dnd_inbound")
            for i, r in enumerate(draft.rows):
                v = read_text(r[ci])
                if v is not None:
                    values[i] = v.lower()
                    draft.payloads[i]["inboundDndSettings"] = {"all": {"status": v.lower()}}

    @staticmethod
    def _identity_and_nulls(draft: _Draft) -> None:
        """The identity column (normalised email, else phone) and why a row has none, then the
        nulls "clear" sends."""
        ident = draft.column("identity")
        emails, phones = draft.cols.get("email"), draft.cols.get("phone")
        for i, nulls in enumerate(draft.nulls):
            ident[i] = (emails[i] if emails else None) or (phones[i] if phones else None)
            if ident[i] is None:
                draft.reasons[i]["identity"] = _why_no_identity(draft.reasons[i])
            for key in nulls:
                draft.payloads[i][key] = None


def _why_no_identity(reasons: dict[str, str]) -> str:
    """Nothing to match a contact on: no email or phone given, or only invalid ones."""
    bad = [name for name in ("email", "phone") if name in reasons]
    if not bad:
        return "identity: neither an email nor a phone given"
    if len(bad) == 2:
        return "identity: email and phone both invalid"
    other = "phone" if bad == ["email"] else "email"
    return f"identity: {bad[0]} invalid and no {other} given"
