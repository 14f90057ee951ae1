"""``make demo LOCATIONS=N``: the demo as an agency whose one warehouse table feeds N locations.

The sandbox gets an agency (company) with N locations where its app is installed and one where it
is not; ``crm_contacts`` gets a ``location_id`` column spread over all N + 1 ids, and a few rows
name an id the agency does not have. The demo's own sync config (the shipped default, its
``locations`` routed by that column through the agency connection) goes to ``var/demo/``, and the
agency itself to ``var/demo/agency.json``, so ``make ui`` serves the same setup again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Column, ColumnElement, Engine, MetaData, Table, Text, column, select, update

from growthhub_sandbox.models import DEMO_LOCATION_ID, demo_config
from growthhub_sandbox.testing import Agency, SandboxAdmin
from growthhub_sync import state
from growthhub_sync.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, SyncConfig
from growthhub_sync.demo import contacts_table, spread_over_locations
from growthhub_sync.outcomes import RUN_COUNTS
from growthhub_sync.reasons import LOCATION_NOT_INSTALLED, LOCATION_UNKNOWN

COMPANY_ID = "demo-agency"
CONN_ID = "growthhub_agency"
LOCATION_COLUMN = "location_id"
UNKNOWN_LOCATION = f"{COMPANY_ID}-loc-unknown"
UNKNOWN_ROWS = 5
# the agency's grant: present so the connection looks like a real one; its token never expires
REFRESH_TOKEN = "demo-agency-refresh-token"  # noqa: S105 - a sandbox token, not a secret


@dataclass(frozen=True)
class AgencyDemo:
    """The agency the demo made, and where its files are (``var/demo/``)."""

    agency: Agency
    uninstalled: str

    @property
    def installed(self) -> tuple[str, ...]:
        return tuple(loc for loc in self.agency.location_ids if loc != self.uninstalled)

    @classmethod
    def create(cls, admin: SandboxAdmin, locations: int) -> AgencyDemo:
        """``locations`` installed locations and, after them, one without the app."""
        # each location like the sandbox's demo location: its users and the lifetime_value custom field
        like_demo = demo_config().locations[DEMO_LOCATION_ID].model_dump(mode="json", exclude_unset=True)
        agency = admin.create_agency(
            COMPANY_ID,
            locations=locations + 1,
            uninstalled=(locations,),
            refresh_token=REFRESH_TOKEN,
            **like_demo,
        )
        return cls(agency, agency.location_ids[locations])

    def save(self, path: Path) -> None:
        """For ``make ui``: the sandbox keeps the agency in its state file, the demo its ids here."""
        path.write_text(json.dumps({**dataclasses.asdict(self.agency), "uninstalled": self.uninstalled}))

    @classmethod
    def load(cls, path: Path) -> AgencyDemo:
        data = json.loads(path.read_text())
        uninstalled = data.pop("uninstalled")
        return cls(Agency(**{**data, "location_ids": tuple(data["location_ids"])}), uninstalled)

    def spread(self, engine: Engine) -> list[str]:
        """Give every row one of the agency's ids, the last :data:`UNKNOWN_ROWS` keys an unknown one."""
        spread_over_locations(engine, self.agency.location_ids, column=LOCATION_COLUMN)
        table = Table(contacts_table().name, MetaData(), Column("id", Text), Column(LOCATION_COLUMN, Text))
        with engine.begin() as conn:
            last = select(table.c.id).order_by(table.c.id.desc()).limit(UNKNOWN_ROWS)
            keys = list(conn.execute(last).scalars())
            conn.execute(
                update(table).where(table.c.id.in_(keys)).values({LOCATION_COLUMN: UNKNOWN_LOCATION})
            )
        return keys

    def edited_rows(self) -> ColumnElement[bool]:
        """The hourly run's edits land in the first half of the installed locations: the rest stay quiet."""
        return column(LOCATION_COLUMN).in_(self.installed[: max(1, len(self.installed) // 2)])

    def env(self, growthhub_conn: dict[str, Any], config_path: Path) -> dict[str, str]:
        """Airflow's connection to the agency, and the sync config that routes rows through it."""
        extra = {
            **growthhub_conn["extra"],
            "company_id": self.agency.company_id,
            "app_id": self.agency.app_id,
            "client_id": self.agency.client_id,
            "client_secret": self.agency.client_secret,
            "refresh_token": self.agency.refresh_token,
        }
        agency = {**growthhub_conn, "password": self.agency.token, "extra": extra}
        return {f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(agency), CONFIG_ENV: str(config_path)}

    def print_contacts(self, admin: SandboxAdmin) -> None:
        total = sum(len(admin.contacts(loc)) for loc in self.installed)
        where = f"the agency's {len(self.installed)} installed locations"
        print(f"\nThe sandbox now holds {total:,} contacts in {where}.")


def write_config(path: Path) -> None:
    """The shipped default config, its ``locations`` read from each row's column via the agency."""
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    data["locations"] = {"from_column": LOCATION_COLUMN, "conn_id": CONN_ID}
    header = f"# The demo's sync config: `make demo LOCATIONS=N` writes it from {DEFAULT_CONFIG_PATH.name}.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def print_locations(engine: Engine, config: SyncConfig, run_id: str, agency: AgencyDemo) -> dict[str, Any]:
    """The run's row of every location that had work, their total, the quiet locations and the
    rows quarantined for their location; returns the run's details (``data_docs``)."""
    tables = state.state_tables(config.state)
    runs = tables.runs
    with engine.connect() as conn:
        of_run = select(runs).where(runs.c.run_id == run_id).order_by(runs.c.location)
        rows = [dict(r._mapping) for r in conn.execute(of_run)]
        reasons = state.run_progress(conn, tables, run_id)["reasons"]
    width = max([len("location"), *(len(r["location"]) for r in rows)])
    print("  " + f"{'location':<{width}}" + "".join(f"{name:>13}" for name in RUN_COUNTS))
    for row in [*rows, {"location": "total", **{n: sum(r[n] for r in rows) for n in RUN_COUNTS}}]:
        print("  " + f"{row['location']:<{width}}" + "".join(f"{row[n]:>13,}" for n in RUN_COUNTS))
    quiet = set(agency.installed) - {r["location"] for r in rows}
    print(f"  quiet (installed, no rows in the run's window): {len(quiet)} of {len(agency.installed)}")
    print(
        f"  quarantined for their location: {reasons.get(LOCATION_NOT_INSTALLED, 0):,} rows of the "
        f"uninstalled {agency.uninstalled} ({LOCATION_NOT_INSTALLED}), {reasons.get(LOCATION_UNKNOWN, 0):,} "
        f"naming {UNKNOWN_LOCATION} ({LOCATION_UNKNOWN})"
    )
    return next((r["details"] for r in rows if (r.get("details") or {}).get("data_docs")), {})
