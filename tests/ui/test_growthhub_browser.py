"""The GrowthHub page in a real browser: headless Chromium from Debian's packages, driven by Playwright.

Logs into a real api-server, opens the page from Airflow's navigation (the UI frames it), filters
the quarantine, selects rows, replays them and checks the replay DAG run Airflow created. The
screenshots land in ``var/screenshots/`` for a reviewer. Without Chromium the test fails: CI
(``.ci/run``) installs it, and a browser test that skips proves nothing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import pytest
from airflow_ui import ROOT, AirflowUI

if TYPE_CHECKING:
    from playwright.sync_api import FrameLocator, Page

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = ROOT / "var" / "screenshots"


def seed_page_data(ui: AirflowUI) -> None:
    """A week of hourly-ish runs per location and the quarantine rows they left."""
    start = datetime.now(UTC) - timedelta(days=7)
    for i in range(24):
        at = start + timedelta(hours=7 * i)
        east = {"unchanged": 900 + 10 * i, "created": 60 + i, "updated": 25, "rejected": i % 4}
        ui.state.run("east", f"scheduled__east{i:02d}", at, quarantined=40 + (i * 37) % 90, **east)
        ui.state.run("west", f"scheduled__west{i:02d}", at, unchanged=300, created=20, quarantined=5 + i % 6)
    reasons = [
        ("quality", "email_invalid", ["email: 'maria.lopez@example.com' is not a valid address"]),
        ("quality", "phone_invalid,email_invalid", ["phone: +1 415 555 01 is too short", "email: no domain"]),
        ("quality", "no_identity", ["neither email nor phone given"]),
        ("api", "api_422", ["422: customFields.lifetime_value must be a number"]),
        ("quality", None, ["dateOfBirth: 1890-01-01 is before 1900"]),
    ]
    for i in range(60):
        stage, codes, errors = reasons[i % len(reasons)]
        ui.state.quarantine(
            "east" if i % 4 else "west",
            f"contact-{1000 + i}",
            stage=stage,
            codes=codes,
            errors=errors,
            email=f"person{i}@example.com",
            phone=f"+1415555{i:04d}",
            at=start + timedelta(hours=3 * i),
        )


def _chromium_page(playwright: object) -> Page:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (.ci/run does)")
    browser = playwright.chromium.launch(executable_path=CHROMIUM)  # type: ignore[attr-defined]
    return browser.new_page(viewport={"width": 1440, "height": 900})


def _open_growthhub(page: Page, ui: AirflowUI, user: str) -> FrameLocator:
    """Log in and land on the page as the UI shows it: its nav entry, the page in the UI's frame."""
    page.goto(f"{ui.base_url}/auth/login?{urlencode({'next': '/plugin/growthhub'})}")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(ui.passwords[user])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/plugin/growthhub**")
    return page.frame_locator("iframe[title='GrowthHub']")


@pytest.mark.slow
@pytest.mark.integration
def test_an_operator_filters_selects_and_replays_quarantined_rows(airflow_ui: AirflowUI) -> None:
    from playwright.sync_api import expect, sync_playwright

    seed_page_data(airflow_ui)
    before = airflow_ui.replay_runs()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=30_000)  # a busy CI host renders the UI slowly
    with sync_playwright() as playwright:
        page = _chromium_page(playwright)
        page.set_default_timeout(30_000)
        frame = _open_growthhub(page, airflow_ui, "operator")

        expect(frame.locator("section[data-location='east'] svg.chart rect")).to_have_count(24)
        expect(frame.locator("section[data-location='west'] table.runs")).to_be_visible()
        page.wait_for_load_state("networkidle")  # the frame's styles and icon, before the picture
        page.screenshot(path=str(SCREENSHOTS / "growthhub_runs.png"), full_page=True)

        frame.get_by_role("link", name="Quarantine", exact=True).click()
        frame.get_by_label("Location").select_option("east")
        frame.get_by_label("Stage").select_option("quality")
        frame.get_by_label("Reason code").fill("email_invalid")
        frame.get_by_role("button", name="Filter").click()
        rows = frame.locator("table.quarantine tbody tr")
        expect(rows).to_have_count(18)  # east, quality, email_invalid (alone or with phone_invalid)
        expect(frame.locator("table.quarantine")).not_to_contain_text("@example.com")

        keys = [rows.nth(i).locator("td.mono").first.inner_text() for i in (0, 2)]
        for i in (0, 2):
            rows.nth(i).locator("input.pick").check()
        expect(frame.locator("#selected-count")).to_have_text("2 selected")
        frame.get_by_role("button", name="Replay selected").click()
        expect(frame.locator("#replay-status")).to_contain_text("Replay queued")
        expect(frame.locator("tr.replayed")).to_have_count(2)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(SCREENSHOTS / "growthhub_page.png"), full_page=True)
        page.context.browser.close()  # type: ignore[union-attr]

    runs = airflow_ui.replay_runs()[len(before) :]
    assert len(runs) == 1
    assert json.loads(runs[0]["conf"]) == {"locations": ["east"], "keys": {"east": sorted(keys)}}
    assert (runs[0]["triggering_user_name"], runs[0]["state"]) == ("operator", "queued")
    assert (SCREENSHOTS / "growthhub_page.png").stat().st_size > 10_000
