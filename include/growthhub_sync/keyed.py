"""Look rows up by their primary key, whatever the planner's statistics say.

A first sync fills the state tables long after they were last analysed (autovacuum lags, or is
off): planned on the small table's statistics, ``location = :loc AND key IN (...)`` becomes a
scan of the location's rows whose cost grows with every chunk. On PostgreSQL the keys are
unnested and each is looked up in a ``LATERAL`` subquery with ``LIMIT 1``: a subquery the planner
cannot flatten into a join, so its only sensible plan is one primary-key probe per key. Other
databases keep the ``IN`` list (SQLite plans it on the primary key anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, bindparam, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement, Select
    from sqlalchemy.sql.elements import KeyedColumnElement


def rows_by_key(
    dialect: str,
    key: KeyedColumnElement[Any],
    keys: Sequence[str],
    columns: Sequence[KeyedColumnElement[Any]],
    where: Sequence[ColumnElement[bool]],
    *,
    lock: bool = False,
) -> Select[Any]:
    """``columns`` of the rows matching ``where`` whose ``key`` is one of ``keys``, in the order of
    ``keys``; ``where`` and ``key`` must cover a unique index (at most one row per key). With
    ``lock``, each row is locked as it is read (``FOR UPDATE``), so sorted keys lock in order."""
    if dialect != "postgresql":
        query = select(*columns).where(*where, key.in_(list(keys))).order_by(key)
        return query.with_for_update() if lock else query
    unnest = func.unnest(bindparam("keys", list(keys), type_=ARRAY(String)))
    wanted = unnest.table_valued("key", with_ordinality="n").render_derived(name="wanted")
    probe = select(*columns).where(*where, key == wanted.c.key).limit(1)
    found = (probe.with_for_update() if lock else probe).lateral("found")
    return select(*found.c).select_from(wanted.join(found, true())).order_by(wanted.c.n)
