"""The fleet: many locations in one run, routed by a column, against a real warehouse.

Rows name their location in ``location_id``; the agency directory is fixed by the test
(:class:`~growthhub_sync.fleet.KnownLocation`); each location has its own fake CRM.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sync_support import DAY, T0, FakeCRM

from growthhub_provider.client import GrowthHubAuthError, UpsertOutcome
from growthhub_sync import failures, state
from growthhub_sync.config import UNROUTED, ConfigError, LocationConfig, SyncConfig, validate_source_columns
from growthhub_sync.demo import contacts_table, seed_demo
from growthhub_sync.fleet import KnownLocation, pack_shards, plan_fleet, replay_fleet, sync_all
from growthhub_sync.pipeline import SyncOptions
from growthhub_sync.testing import Warehouse

ROWS = 60
# row i of the seed (ordered by key) goes to VALUES[i % len(VALUES)]
VALUES = ["loc_a", "loc_b", "loc_a", "loc_gone", "loc_zzz", None, "  ", "loc_b"]
DIRECTORY = [
    KnownLocation("loc_a", "A"),
    KnownLocation("loc_b", "B"),
    KnownLocation("loc_gone", "Gone", installed=False),
    KnownLocation("loc_quiet", "Quiet"),
]


def _directory(conn_id: str) -> list[KnownLocation]:
    assert conn_id == "growthhub_agency"
    return DIRECTORY


def _routed(warehouse: Warehouse, values: list[str | None]) -> dict[str, str | None]:
    """Add the ``location_id`` column and spread ``values`` over the rows; key → value."""
    tbl = contacts_table(warehouse.schema)
    name = f'"{warehouse.schema}".crm_contacts' if warehouse.schema else "crm_contacts"
    with warehouse.engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {name} ADD COLUMN location_id TEXT"))
        keys = list(conn.execute(select(tbl.c.id).order_by(tbl.c.id)).scalars())
        routed = {k: values[i % len(values)] for i, k in enumerate(keys)}
        for key, value in routed.items():
            conn.execute(text(f"UPDATE {name} SET location_id = :v WHERE id = :k"), {"v": value, "k": key})
    return routed


@pytest.fixture
def fleet_config(warehouse: Warehouse, make_config: Callable[..., SyncConfig]) -> SyncConfig:
    seed_demo(warehouse.engine, ROWS, schema=warehouse.schema, start=T0, bad_share=0.0)
    base = make_config().model_dump(by_alias=True, exclude_none=True)
    base["locations"] = {"from_column": "location_id", "conn_id": "growthhub_agency"}
    base.pop("location_routing")
    return SyncConfig.model_validate(base)


class Fleet:
    """One fake CRM per location id, as the agency's per-location tokens would give."""

    def __init__(self, refused: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.crms: dict[str, FakeCRM] = {}
        self.refused = refused

    def __call__(self, location: LocationConfig) -> Any:
        if location.location_id in self.refused:
            return Refusing()
        return self.crms.setdefault(location.location_id, FakeCRM())


class Refusing:
    def upsert_contacts(self, rows: Any, *, daily_reserve: int = 0) -> Iterator[UpsertOutcome]:
        raise GrowthHubAuthError("401: token refused for this location")
        yield  # pragma: no cover


def _sync(config: SyncConfig, warehouse: Warehouse, run_id: str, crm: Fleet) -> dict[str, Any]:
    options = SyncOptions(run_id=run_id)
    return sync_all(config, DAY, options, engine=warehouse.engine, upserter=crm, directory=_directory)


def _run_rows(config: SyncConfig, warehouse: Warehouse, run_id: str) -> dict[str, dict[str, Any]]:
    runs = state.state_tables(config.state).runs
    with warehouse.engine.connect() as conn:
        rows = conn.execute(select(runs).where(runs.c.run_id == run_id))
        return {r.location: dict(r._mapping) for r in rows}


def _open_quarantine(config: SyncConfig, warehouse: Warehouse) -> list[tuple[str, str, str, int]]:
    q = state.state_tables(config.state).quarantine
    with warehouse.engine.connect() as conn:
        rows = conn.execute(
            select(q.c.location, q.c.source_key, q.c.reason_codes, q.c.attempts).where(q.c.status == "open")
        )
        return sorted(tuple(r) for r in rows)  # type: ignore[misc]


def test_rows_of_unknown_uninstalled_and_missing_locations_are_quarantined_never_sent(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    routed = _routed(warehouse, VALUES)
    crm = Fleet()
    out = _sync(fleet_config, warehouse, "r1", crm)

    expected = {
        "loc_a": sum(v == "loc_a" for v in routed.values()),
        "loc_b": sum(v == "loc_b" for v in routed.values()),
        "loc_gone": sum(v == "loc_gone" for v in routed.values()),
        "loc_zzz": sum(v == "loc_zzz" for v in routed.values()),
        UNROUTED: sum(v is None or not v.strip() for v in routed.values()),
    }
    assert {r["location"]: r["extracted"] for r in out["results"]} == expected
    assert set(crm.crms) == {"loc_a", "loc_b"}
    for lid in ("loc_a", "loc_b"):
        assert sorted(k for k, _ in crm.crms[lid].sent) == sorted(k for k, v in routed.items() if v == lid)
    codes = {
        "loc_gone": "location_not_installed",
        "loc_zzz": "location_unknown",
        UNROUTED: "location_missing",
    }
    held = _open_quarantine(fleet_config, warehouse)
    assert {(loc, code) for loc, _, code, _ in held} == set(codes.items())
    assert len(held) == expected["loc_gone"] + expected["loc_zzz"] + expected[UNROUTED]
    runs = _run_rows(fleet_config, warehouse, "r1")
    assert set(runs) == set(expected), "no run row for the quiet location"
    for name in codes:
        assert runs[name]["extracted"] == runs[name]["quarantined"] == expected[name]
    assert out["quiet"] == 1
    assert out["total"]["extracted"] == ROWS

    again = _sync(fleet_config, warehouse, "r2", crm)
    assert [(loc, key, code) for loc, key, code, _ in _open_quarantine(fleet_config, warehouse)] == [
        (loc, key, code) for loc, key, code, _ in held
    ]
    assert {n for *_, n in _open_quarantine(fleet_config, warehouse)} == {2}
    assert {r["location"]: r["quarantined"] for r in again["results"] if r["location"] in codes} == {
        name: expected[name] for name in codes
    }
    assert sum(len(c.sent) for c in crm.crms.values()) == expected["loc_a"] + expected["loc_b"]


def test_one_locations_refused_token_fails_it_alone(warehouse: Warehouse, fleet_config: SyncConfig) -> None:
    routed = _routed(warehouse, ["loc_a", "loc_b"])
    crm = Fleet(refused={"loc_b"})

    out = _sync(fleet_config, warehouse, "r1", crm)

    assert out["failed"] == ["loc_b"]
    by_name = {r["location"]: r for r in out["results"]}
    assert by_name["loc_a"]["status"] == "success"
    assert by_name["loc_a"]["created"] == sum(v == "loc_a" for v in routed.values())
    assert by_name["loc_b"]["status"] == "failed"
    assert "401" in by_name["loc_b"]["error"]
    with warehouse.engine.connect() as conn:
        recorded = failures.recorded_failures(conn, state.state_tables(fleet_config.state), "r1")
    assert [(f.location, f.kind) for f in recorded] == [("loc_b", "connection")]
    assert _run_rows(fleet_config, warehouse, "r1")["loc_b"]["status"] == "failed"


class Storm:
    """A location in a 429 storm: every row comes back ``failed`` 429 once its retries are spent.

    It answers only while the calm location is sending too (and waits for it to finish), so a run
    that served locations one after the other, or let the storm hold the other up, times out.
    """

    def __init__(self) -> None:
        self.storming, self.calm_sending, self.calm_done = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )

    def upsert_contacts(self, rows: Any, *, daily_reserve: int = 0) -> Iterator[UpsertOutcome]:
        self.storming.set()
        assert self.calm_sending.wait(60), "the calm location never sent while the storm lasted"
        for key, _payload in rows:
            assert self.calm_done.wait(60), "the storm held the calm location up"
            yield UpsertOutcome(
                key, "failed", http_status=429, messages=["429: Too Many Requests"], attempts=4
            )


class Calm(FakeCRM):
    """A healthy location that sends only once the storm is on, and says when it is done."""

    def __init__(self, storm: Storm) -> None:
        super().__init__()
        self.storm = storm

    def upsert_contacts(self, rows: Any, *, daily_reserve: int = 0) -> Iterator[UpsertOutcome]:
        assert self.storm.storming.wait(60), "the storming location never started"
        self.storm.calm_sending.set()
        yield from super().upsert_contacts(rows, daily_reserve=daily_reserve)
        self.storm.calm_done.set()


def test_one_locations_429_storm_neither_stops_nor_delays_the_others(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    routed = _routed(warehouse, ["loc_a", "loc_b"])
    storm = Storm()
    calm = Calm(storm)

    out = _sync(fleet_config, warehouse, "r1", lambda loc: storm if loc.location_id == "loc_b" else calm)

    by_name = {r["location"]: r for r in out["results"]}
    assert by_name["loc_a"]["created"] == sum(v == "loc_a" for v in routed.values())
    assert by_name["loc_b"]["deferred"] == sum(v == "loc_b" for v in routed.values())
    assert by_name["loc_b"]["created"] == 0
    assert out["failed"] == [], "throttled rows are deferred to the next run, not a failed location"
    assert {r["status"] for r in out["results"]} == {"success"}
    pending = state.state_tables(fleet_config.state).pending
    with warehouse.engine.connect() as conn:
        waiting = conn.execute(select(pending.c.location, pending.c.source_key)).all()
    assert {(loc, key) for loc, key in waiting} == {("loc_b", k) for k, v in routed.items() if v == "loc_b"}


def test_quiet_locations_cost_no_query_each(warehouse: Warehouse, fleet_config: SyncConfig) -> None:
    _routed(warehouse, ["loc_a"])
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(warehouse.engine, "before_cursor_execute", record)

    def plan(quiet: int) -> int:
        directory = [KnownLocation("loc_a"), *(KnownLocation(f"quiet_{i}") for i in range(quiet))]
        statements.clear()
        out = plan_fleet(
            fleet_config, DAY, SyncOptions(run_id=f"q{quiet}", dry_run=True),
            engine=warehouse.engine, directory=lambda _: directory,
        )  # fmt: skip
        assert (out["quiet"], list(out["locations"])) == (quiet, ["loc_a"])
        return len(statements)

    try:
        plan(1)  # creates the state tables
        assert plan(5) == plan(300)
    finally:
        event.remove(warehouse.engine, "before_cursor_execute", record)


def test_a_big_location_is_sliced_and_small_ones_share_shards(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    _routed(warehouse, ["big"] * 7 + [f"small_{i}" for i in range(5)])
    directory = [KnownLocation("big"), *(KnownLocation(f"small_{i}") for i in range(5))]
    out = plan_fleet(
        fleet_config, DAY, SyncOptions(dry_run=True), engine=warehouse.engine,
        directory=lambda _: directory, max_shards=3, batch_rows=10,
    )  # fmt: skip
    shards = out["shards"]
    assert len(shards) == 3
    items = [i for s in shards for i in s]
    assert sum(i["rows"] for i in items) == ROWS
    big = [i for i in items if i["location"] == "big"]
    assert len(big) == 4  # 35 rows in ranges of 10
    loads = [sum(i["rows"] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 10


def test_packing_balances_rows_over_at_most_max_shards() -> None:
    items = [{"location": f"s{i}", "lo": None, "hi": None, "rows": 3} for i in range(40)]
    items += [{"location": "big", "lo": n * 100, "hi": n * 100 + 100, "rows": 100} for n in range(4)]
    shards = pack_shards(items, 6, shard_rows=50)
    assert len(shards) == 6
    assert sorted(i["location"] + str(i["lo"]) for s in shards for i in s) == sorted(
        i["location"] + str(i["lo"]) for i in items
    )
    loads = [sum(i["rows"] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 100
    assert pack_shards(items[:2], 6, shard_rows=3) == [[items[0]], [items[1]]]
    (one,) = pack_shards(items, 6, shard_rows=1000)  # 520 rows: one shard
    assert sorted(map(repr, one)) == sorted(map(repr, items))
    assert len(pack_shards(items, 6, shard_rows=200)) == 3


def test_requested_names_must_be_known(warehouse: Warehouse, fleet_config: SyncConfig) -> None:
    _routed(warehouse, ["loc_a", "loc_b"])
    plan = functools.partial(
        plan_fleet,
        fleet_config,
        DAY,
        SyncOptions(dry_run=True),
        engine=warehouse.engine,
        directory=_directory,
    )
    assert list(plan(requested=["loc_b"])["locations"]) == ["loc_b"]
    with pytest.raises(ConfigError, match=r"params\.locations: unknown location\(s\) \['nope'\]"):
        plan(requested=["nope"])


def test_a_listed_location_overrides_name_connection_and_mapping(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    routed = _routed(warehouse, ["loc_a", "loc_b"])
    data = fleet_config.model_dump(by_alias=True, exclude_none=True)
    data.pop("location_routing")
    data["locations"] = {
        "from_column": "location_id",
        "conn_id": "growthhub_agency",
        "list": [{"name": "big_client", "location_id": "loc_b", "conn_id": "growthhub_big",
                  "mapping": {"fields": {"email": "email", "firstName": "city"}}}],
    }  # fmt: skip
    config = SyncConfig.model_validate(data)
    assert config.location("loc_b") == config.location("big_client")
    assert config.location("big_client").conn_id == "growthhub_big"
    assert config.location("loc_a").conn_id == "growthhub_agency"
    crm = Fleet()
    out = _sync(config, warehouse, "r1", crm)
    assert sorted(r["location"] for r in out["results"]) == ["big_client", "loc_a"]
    sent = dict(crm.crms["loc_b"].sent)
    assert sent
    assert set(sent) <= {k for k, v in routed.items() if v == "loc_b"}
    assert {r["location"]: r["extracted"] for r in out["results"]}["big_client"] == len(routed) // 2
    assert all(set(p) <= {"email", "firstName", "locationId"} for p in sent.values())


def test_from_column_must_be_a_real_column(fleet_config: SyncConfig, warehouse: Warehouse) -> None:
    data = fleet_config.model_dump(by_alias=True, exclude_none=True)
    data.pop("location_routing")
    data["locations"] = {"from_column": "no_such_column"}
    with pytest.raises(ConfigError, match=r"locations\.from_column: column 'no_such_column'"):
        validate_source_columns(SyncConfig.model_validate(data), warehouse.engine)


def test_a_row_moved_to_another_location_leaves_the_old_quarantine_once_handled_there(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    routed = _routed(warehouse, VALUES)
    _sync(fleet_config, warehouse, "r1", Fleet())
    first = {val: min(k for k, v in routed.items() if v == val) for val in ("loc_gone", "loc_zzz", None)}
    moves = {first[None]: "loc_a", first["loc_gone"]: "loc_zzz", first["loc_zzz"]: "loc_b"}
    name = f'"{warehouse.schema}".crm_contacts' if warehouse.schema else "crm_contacts"
    with warehouse.engine.begin() as conn:  # fixed at the source (the run's window holds every row)
        for key, value in moves.items():
            conn.execute(text(f"UPDATE {name} SET location_id = :v WHERE id = :k"), {"v": value, "k": key})
    before = {(loc, key) for loc, key, *_ in _open_quarantine(fleet_config, warehouse)}

    crm = Fleet(refused={"loc_b"})  # the row moved to loc_b is not handled this run
    out = _sync(fleet_config, warehouse, "r2", crm)

    assert out["failed"] == ["loc_b"]
    assert str(first[None]) in {k for k, _ in crm.crms["loc_a"].sent}
    after = {(loc, key) for loc, key, *_ in _open_quarantine(fleet_config, warehouse)}
    gone, zzz = str(first["loc_gone"]), str(first["loc_zzz"])
    assert before - after == {(UNROUTED, str(first[None])), ("loc_gone", gone)}
    assert after - before == {("loc_zzz", gone)}, "quarantined again where it is now"
    assert ("loc_zzz", zzz) in after, "kept open until loc_b handles it"


def test_a_deferred_row_moved_to_another_location_leaves_the_old_backlog(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    routed = _routed(warehouse, VALUES)
    crm = Fleet()
    crm.crms["loc_a"] = FakeCRM(quota=0)  # loc_a's quota is spent: its rows wait
    _sync(fleet_config, warehouse, "r1", crm)
    waiting = sorted(str(k) for k, v in routed.items() if v == "loc_a")
    assert _pending(fleet_config, warehouse) == [("loc_a", k) for k in waiting]
    to_b, to_unknown = waiting[:2]
    name = f'"{warehouse.schema}".crm_contacts' if warehouse.schema else "crm_contacts"
    with warehouse.engine.begin() as conn:
        for key, value in ((to_b, "loc_b"), (to_unknown, "loc_new")):
            conn.execute(text(f"UPDATE {name} SET location_id = :v WHERE id = :k"), {"v": value, "k": key})

    out = _sync(fleet_config, warehouse, "r2", crm)

    assert to_b in {k for k, _ in crm.crms["loc_b"].sent}
    held = {(loc, key) for loc, key, *_ in _open_quarantine(fleet_config, warehouse)}
    assert ("loc_new", to_unknown) in held
    assert _pending(fleet_config, warehouse) == [("loc_a", k) for k in waiting[2:]]
    loc_a = next(r for r in out["results"] if r["location"] == "loc_a")
    assert loc_a["backlog"] == len(waiting) - 2


def _pending(config: SyncConfig, warehouse: Warehouse) -> list[tuple[str, str]]:
    p = state.state_tables(config.state).pending
    with warehouse.engine.connect() as conn:
        return sorted((loc, key) for loc, key in conn.execute(select(p.c.location, p.c.source_key)))


def test_replay_resends_rows_of_installed_locations_and_leaves_unroutable_ones_waiting(
    warehouse: Warehouse, fleet_config: SyncConfig
) -> None:
    routed = _routed(warehouse, VALUES)
    refused = sorted(k for k, v in routed.items() if v == "loc_a")[0]
    crm = Fleet()
    crm.crms["loc_a"] = FakeCRM(reject={refused: ["the CRM refused it"]})
    _sync(fleet_config, warehouse, "r1", crm)
    assert ("loc_a", refused, "api_422", 1) in _open_quarantine(fleet_config, warehouse)
    crm.crms["loc_a"].reject.clear()  # fixed at GrowthHub

    out = replay_fleet(
        fleet_config,
        SyncOptions(run_id="replay1"),
        engine=warehouse.engine,
        upserter=crm,
        directory=_directory,
    )

    assert sorted(out["waiting"]) == sorted([UNROUTED, "loc_gone", "loc_zzz"])
    assert [(r["location"], r["selected"], r["created"]) for r in out["results"]] == [("loc_a", 1, 1)]
    assert refused not in {key for _, key, _, _ in _open_quarantine(fleet_config, warehouse)}
    assert {loc for loc, *_ in _open_quarantine(fleet_config, warehouse)} == {UNROUTED, "loc_gone", "loc_zzz"}

    # asking for a location still not installed (as the page's replay button may) is no error
    again = replay_fleet(
        fleet_config,
        SyncOptions(run_id="replay2"),
        requested=["loc_gone"],
        engine=warehouse.engine,
        upserter=crm,
        directory=_directory,
    )
    assert (again["results"], again["failed"]) == ([], [])
    assert "loc_gone" in again["waiting"]
