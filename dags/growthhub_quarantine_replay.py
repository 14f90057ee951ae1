"""Re-send quarantined contacts whose source rows were fixed; by hand, or on the configured schedule."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from growthhub_sync.config import load_config
from growthhub_sync.operator_view import report_run
from growthhub_sync.orchestration import (
    DEFAULT_ARGS,
    REPLAY_DAG_ID,
    fails_fast,
    on_run_failure,
    pool_name,
    selected_locations,
    summary_table,
)
from growthhub_sync.reasons import REASONS

if TYPE_CHECKING:
    from growthhub_sync.config import LocationConfig

CONFIG = load_config()
log = logging.getLogger(__name__)

DOC = """
### GrowthHub quarantine replay

Re-reads open rows of `growthhub_quarantine`, takes the **current** source row of each, checks it
and sends it again. What now syncs is marked `resolved`; what still fails stays `open` with
`attempts + 1` and its new reasons; rows deleted from the source are marked `ignored`.

Use it after fixing rows at the source (bad emails, phones, birth dates...) or after a GrowthHub
setting changed (a missing custom field, a user). **Params**: `locations` (empty = all), `stage`
(`quality` or `api`), `reason` (reason codes: rows having any of them; empty = all), `keys`
(location name → source keys to replay; a location not listed, or an empty list, = all its
rows), `max_rows` per location, `dry_run`. The README's "Reason codes" table lists the codes.
"""


@dag(
    dag_id=REPLAY_DAG_ID,
    schedule=CONFIG.replay_schedule,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    on_failure_callback=on_run_failure,
    params={
        "locations": Param(
            [],
            type="array",
            items={"type": "string", "enum": [loc.name for loc in CONFIG.locations]},
            description="Location names to replay; empty = all.",
        ),
        "stage": Param(None, type=["null", "string"], enum=[None, "quality", "api"]),
        "reason": Param(
            [],
            type="array",
            items={"type": "string", "enum": list(REASONS)},
            description="Reason codes: rows having any of them; empty = all.",
        ),
        "keys": Param(
            {},
            type="object",
            additionalProperties={"type": "array", "items": {"type": "string"}},
            description="Location name → source keys to replay; empty = all rows.",
        ),
        "max_rows": Param(10_000, type="integer", minimum=1, description="Rows per location at most."),
        "dry_run": Param(False, type="boolean"),
    },
    tags=["growthhub", "reverse-etl", "quarantine"],
    doc_md=DOC,
)
def growthhub_quarantine_replay() -> None:
    @task(retries=0, trigger_rule="none_failed")  # a retry would count the metrics twice
    def report(results: list[dict[str, Any] | None]) -> None:
        done = [r for r in results if r]
        log.info("GrowthHub replay summary\n%s", summary_table(done))
        report_run(get_current_context(), done, prefix="growthhub.replay")

    report([replay_location(location) for location in CONFIG.locations])


def replay_location(location: LocationConfig) -> Any:
    name = location.name

    @task(task_id=f"replay_{name}", pool=pool_name(location.location_id))
    @fails_fast(CONFIG, name)
    def replay(params: dict[str, Any]) -> dict[str, Any] | None:
        from growthhub_sync.pipeline import SyncOptions, replay_quarantine

        context = get_current_context()
        if name not in selected_locations(CONFIG, params["locations"]):
            return None
        options = SyncOptions(run_id=context["run_id"], dag_id=REPLAY_DAG_ID, dry_run=params["dry_run"])
        return replay_quarantine(
            CONFIG,
            name,
            options,
            stage=params["stage"],
            reason=params["reason"],
            keys=params["keys"].get(name, []),
            max_rows=params["max_rows"],
        )

    return replay()


growthhub_quarantine_replay()
