"""The GrowthHub page on a real ``airflow api-server``: found as a plugin, behind Airflow's login,
reading through Airflow's permissions, replaying only for users who may trigger the replay DAG.

Users of the simple auth manager: ``viewer`` (may read DAG runs), ``operator`` (role *user*: may
also trigger DAGs). The warehouse is reached through the ``warehouse_default`` connection.
"""

from __future__ import annotations

import json

import pytest
from airflow_ui import AirflowUI

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_airflow_loads_the_plugin_and_its_nav_entry(airflow_ui: AirflowUI) -> None:
    plugins = {p["name"]: p for p in airflow_ui.get("/api/v2/plugins", "viewer").json()["plugins"]}

    assert "growthhub" in plugins, "the airflow.plugins entry point is missing: make venv (pip install -e .)"
    assert [a["url_prefix"] for a in plugins["growthhub"]["fastapi_apps"]] == ["/growthhub"]
    view = plugins["growthhub"]["external_views"][0]
    assert (view["href"], view["url_route"], view["destination"]) == ("growthhub/", "growthhub", "nav")
    assert airflow_ui.get("/api/v2/plugins/importErrors", "viewer").json()["import_errors"] == []


def test_without_a_login_the_api_answers_401_and_the_page_sends_to_the_login(airflow_ui: AirflowUI) -> None:
    assert airflow_ui.get("/growthhub/api/quarantine").status_code == 401
    assert airflow_ui.post("/growthhub/api/replay", json={"ids": [1]}).status_code == 401
    page = airflow_ui.get("/growthhub/quarantine?location=east", allow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"].startswith("/auth/login?next=")


def test_a_viewer_reads_the_page_but_may_not_replay(airflow_ui: AirflowUI) -> None:
    row = airflow_ui.state.quarantine("east", "viewer-1")
    before = airflow_ui.replay_runs()

    rows = airflow_ui.get("/growthhub/api/quarantine", "viewer", params={"location": "east"}).json()["rows"]
    page = airflow_ui.get("/growthhub/quarantine", "viewer").text
    refused = airflow_ui.post("/growthhub/api/replay", "viewer", json={"ids": [row]})

    assert [r["source_key"] for r in rows] == ["viewer-1"]
    assert 'data-forbidden="1"' in page
    assert refused.status_code == 403
    assert airflow_ui.replay_runs() == before


def test_an_operator_replay_queues_a_run_of_the_replay_dag_with_the_keys(airflow_ui: AirflowUI) -> None:
    ids = [airflow_ui.state.quarantine(loc, key) for loc, key in [("east", "op-1"), ("west", "op-2")]]
    before = airflow_ui.replay_runs()

    response = airflow_ui.post("/growthhub/api/replay", "operator", json={"ids": ids})

    assert response.status_code == 200, response.text
    new = airflow_ui.replay_runs()[len(before) :]
    assert [r["run_id"] for r in new] == [response.json()["dag_run_id"]]
    assert json.loads(new[0]["conf"]) == {
        "locations": ["east", "west"],
        "keys": {"east": ["op-1"], "west": ["op-2"]},
    }
    assert (new[0]["triggering_user_name"], new[0]["state"]) == ("operator", "queued")
