"""The GrowthHub page's FastAPI app in-process, on real state tables (SQLite and PostgreSQL).

Who may read and replay is Airflow's auth manager's answer; here it is fixed (the dependencies of
``growthhub_operator.access`` are overridden) so these tests need no metadata DB. The real checks,
with a real api-server and its users, are in ``test_growthhub_server.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi import HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from ui_support import T0, StateDB, write_config

from growthhub_operator import access, queries
from growthhub_operator.app import SUMMARY_FROM, _age, create_app, replay_allowed, replay_trigger
from growthhub_operator.chart import runs_chart
from growthhub_operator.queries import RunRow
from growthhub_sync import state
from growthhub_sync.config import CONFIG_ENV

Triggered = list[tuple[dict[str, Any], str]]


@pytest.fixture
def triggered() -> Triggered:
    return []


@pytest.fixture
def make_client(triggered: Triggered) -> Iterator[Callable[..., TestClient]]:
    """A client of the page as a logged-in user; ``can_replay`` says what the auth manager answers."""
    clients: list[TestClient] = []

    def make(*, can_replay: bool = True) -> TestClient:
        app = create_app()

        def refuse() -> None:
            raise HTTPException(403, "Forbidden")

        def trigger(conf: dict[str, Any], user: Any) -> str:
            triggered.append((conf, user.get_name()))
            return f"manual__{len(triggered)}"

        app.dependency_overrides[access.can_read_runs] = lambda: None
        app.dependency_overrides[access.can_trigger_replay] = (lambda: None) if can_replay else refuse
        app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="ops", role="user")
        app.dependency_overrides[replay_allowed] = lambda: can_replay
        app.dependency_overrides[replay_trigger] = lambda: trigger
        clients.append(TestClient(app))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def _rows(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/api/quarantine", params=params)
    assert response.status_code == 200, response.text
    return response.json()["rows"]


def _keys(client: TestClient, **params: Any) -> list[str]:
    return [r["source_key"] for r in _rows(client, **params)]


def _location_options(page: str) -> list[str]:
    """The locations the quarantine page's location filter offers."""
    select = page.split('<select name="location">')[1].split("</select>")[0]
    return re.findall(r'<option value="([^"]+)"', select)


class TestQuarantineList:
    def test_lists_open_rows_newest_first_with_personal_data_masked(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        state_db.quarantine("east", "k1", at=T0, errors=["email jane.doe@example.com is not valid"])
        state_db.quarantine("east", "k2", at=T0 + timedelta(hours=1), stage="api", codes="api_422")
        state_db.quarantine("east", "k3", at=T0 + timedelta(hours=2))
        state_db.resolve("east", ["k3"])

        rows = _rows(make_client())

        assert [r["source_key"] for r in rows] == ["k2", "k1"]
        first = rows[1]
        assert first["email"] == "j***@***.com"
        assert first["phone"] == "***23"
        assert first["errors"] == ["email j***@***.com is not valid"]
        assert (first["stage"], first["codes"], first["attempts"]) == ("quality", ["email_invalid"], 1)
        assert (rows[0]["stage"], rows[0]["http_status"], rows[0]["codes"]) == ("api", 422, ["api_422"])
        assert "jane.doe" not in str(rows)
        assert "4155550123" not in str(rows)

    def test_a_row_without_reason_codes_shows_and_filters_as_unknown(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        state_db.quarantine("east", "old", codes=None)
        state_db.quarantine("east", "new", codes="phone_invalid")
        client = make_client()

        assert {r["source_key"]: r["codes"] for r in _rows(client)} == {
            "old": ["unknown"],
            "new": ["phone_invalid"],
        }
        assert _keys(client, code="unknown") == ["old"]

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"location": "west"}, ["w1"]),
            ({"stage": "api"}, ["w1", "e2"]),
            ({"location": "east", "stage": "api"}, ["e2"]),
            ({"code": "email_invalid"}, ["e3", "e1"]),  # one code among several, first or not
            ({"code": "email"}, []),  # whole codes only, not a prefix
            ({"code": "phone_invalid", "location": "east"}, ["e1"]),
            ({"location": "", "stage": "", "code": ""}, ["e3", "w1", "e2", "e1"]),  # empty form fields
        ],
    )
    def test_filters_by_location_stage_and_code(
        self,
        state_db: StateDB,
        make_client: Callable[..., TestClient],
        params: dict[str, str],
        expected: list[str],
    ) -> None:
        state_db.quarantine("east", "e1", at=T0, codes="phone_invalid,email_invalid")
        state_db.quarantine("east", "e2", at=T0 + timedelta(minutes=1), stage="api", codes="api_422")
        state_db.quarantine("west", "w1", at=T0 + timedelta(minutes=2), stage="api", codes="api_400")
        state_db.quarantine("east", "e3", at=T0 + timedelta(minutes=3), codes="email_invalid,dob_invalid")

        assert _keys(make_client(), **params) == expected

    @pytest.mark.parametrize(("params"), [{"stage": "transform"}, {"code": "x' OR 1=1 --"}, {"limit": "0"}])
    def test_refuses_a_filter_it_cannot_apply(
        self, state_db: StateDB, make_client: Callable[..., TestClient], params: dict[str, str]
    ) -> None:
        assert make_client().get("/api/quarantine", params=params).status_code == 422

    def test_pages_follow_a_cursor_without_gaps_or_repeats(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        for i in range(7):  # two locations, two stages: the page merges four index ranges
            location, stage = ("east", "west")[i % 2], ("quality", "api")[i % 3 == 0]
            state_db.quarantine(location, f"k{i}", stage=stage, at=T0 + timedelta(minutes=i))
        client = make_client()

        pages, before = [], None
        while True:
            response = client.get(
                "/api/quarantine", params={"limit": 3, **({"before": before} if before else {})}
            )
            body = response.json()
            pages.append([r["source_key"] for r in body["rows"]])
            before = body["next_before"]
            if before is None:
                break
            state_db.quarantine(
                "east", f"late{len(pages)}", at=T0 + timedelta(days=1)
            )  # lands on page 1 only

        assert pages == [["k6", "k5", "k4"], ["k3", "k2", "k1"], ["k0"]]

    def test_a_filtered_page_ends_when_the_rows_do(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        for i in range(4):
            state_db.quarantine("west", f"k{i}", at=T0 + timedelta(minutes=i))
        body = make_client().get("/api/quarantine", params={"location": "west", "limit": 4}).json()
        assert (len(body["rows"]), body["next_before"]) == (4, None)


class TestReplay:
    def test_queues_one_run_with_the_keys_of_the_selected_open_rows(
        self, state_db: StateDB, make_client: Callable[..., TestClient], triggered: Triggered
    ) -> None:
        ids = {
            key: state_db.quarantine(loc, key)
            for loc, key in [("east", "e1"), ("east", "e2"), ("west", "w1")]
        }
        closed = state_db.quarantine("east", "gone")
        state_db.resolve("east", ["gone"])

        response = make_client().post("/api/replay", json={"ids": [ids["e2"], ids["w1"], ids["e1"], closed]})

        assert response.status_code == 200, response.text
        assert response.json() == {
            "dag_id": "growthhub_quarantine_replay",
            "dag_run_id": "manual__1",
            "rows": 3,
            "skipped": 1,
        }
        assert triggered == [
            ({"locations": ["east", "west"], "keys": {"east": ["e1", "e2"], "west": ["w1"]}}, "ops")
        ]

    def test_refuses_when_no_selected_row_is_open(
        self, state_db: StateDB, make_client: Callable[..., TestClient], triggered: Triggered
    ) -> None:
        closed = state_db.quarantine("east", "gone")
        state_db.resolve("east", ["gone"])
        assert make_client().post("/api/replay", json={"ids": [closed, 10_000]}).status_code == 409
        assert triggered == []

    def test_refused_by_the_auth_manager_triggers_nothing(
        self, state_db: StateDB, make_client: Callable[..., TestClient], triggered: Triggered
    ) -> None:
        row = state_db.quarantine("east", "e1")
        client = make_client(can_replay=False)

        assert client.post("/api/replay", json={"ids": [row]}).status_code == 403
        page = client.get("/quarantine").text
        assert re.search(r'<button id="replay"[^>]*data-forbidden="1"', page)
        assert triggered == []

    @pytest.mark.parametrize("body", [{"ids": []}, {"ids": list(range(1, 1002))}, {"keys": ["e1"]}])
    def test_refuses_a_malformed_request(
        self, state_db: StateDB, make_client: Callable[..., TestClient], body: dict[str, Any]
    ) -> None:
        assert make_client().post("/api/replay", json=body).status_code == 422


class TestPages:
    def test_runs_page_has_a_chart_and_the_counts_per_location(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        for i in range(3):
            state_db.run("east", f"run{i}", T0 + timedelta(hours=i), unchanged=90 - i, quarantined=10 + i)
        state_db.quarantine("east", "e1")

        client = make_client()
        page = client.get("/").text
        runs = client.get("/api/runs").json()["locations"]

        east = page.split('data-location="east"')[1].split('data-location="west"')[0]
        assert east.count("<rect") == 3  # one bar per run
        assert "1 open quarantine rows" in east
        assert "<polyline" in east
        assert [r["run_id"] for r in runs[0]["runs"]] == ["run2", "run1", "run0"]
        assert runs[0]["runs"][0]["counts"]["quarantined"] == 12
        assert runs[0]["runs"][0]["reject_rate"] == pytest.approx(0.12)
        assert (runs[1]["location"], runs[1]["runs"], runs[1]["open_rows"]) == ("west", [], 0)
        assert client.get("/runs").text == page

    def test_runs_page_shows_deletes_the_backlog_and_the_read_back(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        eta = (T0 + timedelta(days=3)).date()
        state_db.run("east", "run0", T0, created=500, deferred=1500, columns={"backlog": 1500, "eta": eta})
        checked = {"verify_checked": 3, "verify_mismatched": 1}
        state_db.run("east", "run1", T0 + timedelta(days=1), created=500, deleted=2, columns=checked)

        client = make_client()
        east = client.get("/").text.split('data-location="east"')[1].split('data-location="west"')[0]
        rows = east.split("<tbody>")[1].split("</tr>")
        assert '<span class="mismatch"' in rows[0]
        assert ">1 of 3 differ<" in rows[0]
        assert f'1,500 <span class="muted">ETA {eta}</span>' in rows[1]
        assert "differ" not in rows[1], "no read-back: nothing shown"
        newest, oldest = client.get("/api/runs").json()["locations"][0]["runs"]
        read_back = (newest["verify_checked"], newest["verify_mismatched"])
        assert (newest["counts"]["deleted"], read_back) == (2, (3, 1))
        assert (oldest["backlog"], oldest["eta"]) == (1500, eta.isoformat())

    def test_runs_page_counts_open_rows_up_to_a_cap(
        self, state_db: StateDB, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(queries, "COUNT_CAP", 2)
        for key in ("a", "b", "c"):
            state_db.quarantine("east", key)
        state_db.quarantine("west", "d")
        page = make_client().get("/").text
        assert "over 2 open quarantine rows" in page
        assert "1 open quarantine rows" in page

    def test_quarantine_page_shows_masked_rows_and_a_next_page_link(
        self, state_db: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        for i in range(51):
            state_db.quarantine("west", f"k{i:02d}", at=T0 + timedelta(minutes=i))
        page = make_client().get("/quarantine", params={"location": "west"}).text

        assert page.count('class="pick"') == 50
        assert "j***@***.com" in page
        assert "jane.doe@example.com" not in page
        older = re.search(r'id="older" href="quarantine\?([^"]+)"', page)
        assert older
        assert older.group(1).startswith("location=west&amp;before=")

    def test_pages_say_so_before_the_first_sync(
        self, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., TestClient]
    ) -> None:
        path = write_config(tmp_path / "sync.yaml", url=f"sqlite:///{tmp_path / 'empty.db'}")
        monkeypatch.setenv(CONFIG_ENV, str(path))
        client = make_client()
        assert "No sync has run yet" in client.get("/").text
        assert "No open quarantine rows" in client.get("/quarantine").text

    def test_static_files_are_served_by_the_app(self, make_client: Callable[..., TestClient]) -> None:
        client = make_client()
        assert "api/replay" in client.get("/static/quarantine.js").text
        assert client.get("/static/growthhub.css").status_code == 200


class TestDiscoveredLocations:
    """``locations.from_column``: the config lists overrides only; the page shows the locations the
    state tables know (open quarantine rows, runs) plus the overrides."""

    @pytest.fixture
    def discovered(self, state_db: StateDB) -> StateDB:
        write_config(state_db.config_path, url=state_db.url, schema=state_db.schema, overrides=["north"])
        state_db.quarantine("loc-a", "a1", at=T0)
        state_db.quarantine("loc-b", "b1", at=T0 + timedelta(minutes=1), stage="api", codes="api_422")
        state_db.quarantine("loc-a", "a2", at=T0 + timedelta(minutes=2), stage="api", codes="api_400")
        state_db.quarantine("loc-c", "c1", at=T0 + timedelta(minutes=3))
        state_db.resolve("loc-c", ["c1"])  # no open row left: not on the quarantine page
        state_db.quarantine("_unrouted", "u1", at=T0 + timedelta(minutes=4), codes="location_missing")
        for i, location in enumerate(("loc-a", "loc-d", "loc-a")):
            state_db.run(location, f"run{i}", T0 + timedelta(hours=i), unchanged=9, quarantined=1)
        return state_db

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({}, ["u1", "a2", "b1", "a1"]),
            ({"location": "loc-b"}, ["b1"]),
            ({"location": "loc-c"}, []),
            ({"stage": "api"}, ["a2", "b1"]),
            ({"stage": "quality", "location": "loc-a"}, ["a1"]),
            ({"code": "api_422"}, ["b1"]),
        ],
    )
    def test_lists_and_filters_the_open_rows_of_every_discovered_location(
        self,
        discovered: StateDB,
        make_client: Callable[..., TestClient],
        params: dict[str, str],
        expected: list[str],
    ) -> None:
        assert _keys(make_client(), **params) == expected

    def test_quarantine_page_offers_the_locations_holding_open_rows_and_the_overrides(
        self, discovered: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        page = make_client().get("/quarantine").text
        assert _location_options(page) == ["_unrouted", "loc-a", "loc-b", "north"]

    def test_runs_page_shows_the_locations_with_runs_and_the_overrides(
        self, discovered: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        runs = make_client().get("/api/runs").json()["locations"]
        assert [(s["location"], s["open_rows"], [r["run_id"] for r in s["runs"]]) for s in runs] == [
            ("loc-a", 2, ["run2", "run0"]),
            ("loc-d", 0, ["run1"]),
            ("north", 0, []),
        ]

    def test_runs_page_of_an_agency_is_one_row_per_location_each_linking_to_its_runs(
        self, discovered: StateDB, make_client: Callable[..., TestClient]
    ) -> None:
        for i in range(SUMMARY_FROM):  # with loc-a, loc-d and north: over the page's full sections
            discovered.run(f"sub-{i:02d}", f"run-sub-{i}", T0 + timedelta(hours=i), created=5, rejected=i)
        client = make_client()

        page = client.get("/").text

        rows = re.findall(r'<tr data-location="([^"]+)">', page)
        assert rows == ["loc-a", "loc-d", "north", *[f"sub-{i:02d}" for i in range(SUMMARY_FROM)]]
        assert "<svg" not in page, "no chart per location"
        sub = page.split('<tr data-location="sub-03">')[1].split("</tr>")[0]
        assert 'href="runs?location=sub-03"' in sub
        assert re.findall(r'<td class="num">([^<]+)</td>', sub)[:6] == ["8", "5", "0", "0", "3", "0"]
        assert "no run yet" in page.split('<tr data-location="north">')[1].split("</tr>")[0]

        one = client.get("/runs", params={"location": "loc-a"}).text
        assert re.findall(r'data-location="([^"]+)"', one) == ["loc-a"]
        assert one.count("<rect") == 2, "its own chart: one bar per run"
        api = client.get("/api/runs", params={"location": "loc-a"}).json()["locations"]
        assert [(s["location"], len(s["runs"])) for s in api] == [("loc-a", 2)]
        assert len(client.get("/api/runs").json()["locations"]) == 3 + SUMMARY_FROM, "the API lists all"

    def test_replay_names_the_discovered_location(
        self, discovered: StateDB, make_client: Callable[..., TestClient], triggered: Triggered
    ) -> None:
        row = _rows(make_client(), location="loc-b")[0]
        assert make_client().post("/api/replay", json={"ids": [row["id"]]}).status_code == 200
        assert triggered == [({"locations": ["loc-b"], "keys": {"loc-b": ["b1"]}}, "ops")]


def test_explicit_locations_stay_in_config_order_without_the_unlisted_ones(
    state_db: StateDB, make_client: Callable[..., TestClient]
) -> None:
    """A listed config shows its locations, those without rows too, and no location it does not list."""
    state_db.quarantine("west", "w1")
    state_db.quarantine("stray", "s1")
    state_db.run("stray", "run0", T0)
    client = make_client()
    assert [s["location"] for s in client.get("/api/runs").json()["locations"]] == ["east", "west"]
    page = client.get("/quarantine").text
    assert _location_options(page) == ["east", "west"]


@pytest.mark.parametrize(
    ("table", "index"),
    [("growthhub_quarantine", "ix_growthhub_quarantine_open_page"),
     ("growthhub_sync_runs", "ix_growthhub_sync_runs_location")],
)  # fmt: skip
def test_existing_state_tables_get_the_page_indexes(state_db: StateDB, table: str, index: str) -> None:
    """A warehouse whose state tables predate the page's indexes gets them from the next sync."""
    with state_db.engine.begin() as conn:
        conn.execute(text(f"DROP INDEX {state_db.schema + '.' if state_db.schema else ''}{index}"))
    state.ensure_state(state_db.engine, state_db.tables)
    found = inspect(state_db.engine).get_indexes(table, schema=state_db.schema)
    assert index in {i["name"] for i in found}


def test_the_chart_escapes_what_it_draws_from_the_data() -> None:
    run = RunRow("<script>", "east", None, "success", False, {"extracted": 5}, None, None, None, None)
    svg = runs_chart([run])
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg


@pytest.mark.parametrize(
    ("delta", "text"),
    [(timedelta(seconds=30), "0m"), (timedelta(minutes=7), "7m"), (timedelta(hours=5, minutes=12), "5h 12m"),
     (timedelta(days=3, hours=4, minutes=9), "3d 4h")],
)  # fmt: skip
def test_age_shows_its_two_largest_units(delta: timedelta, text: str) -> None:
    assert _age(T0, T0 + delta) == text
