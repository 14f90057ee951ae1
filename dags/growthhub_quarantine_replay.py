"""Re-send quarantined contacts whose source rows were fixed; by hand, or on the configured schedule."""

from __future__ import annotations

import logging
from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from growthhub_sync.config import load_config
from growthhub_sync.operator_view import report_run
from growthhub_sync.orchestration import (
    DEFAULT_ARGS,
    REPLAY_DAG_ID,
    fails_fast,
    on_run_failure,
    summary_table,
)
from growthhub_sync.reasons import REASONS

CONFIG = load_config()
log = logging.getLogger(__name__)

DOC = """
### GrowthHub quarantine replay

One task re-reads the open rows of `growthhub_quarantine` of every location (the configured list;
with `locations.from_column`, every installed location holding some: rows of a location still
not installed wait), takes the **current** source row of each, checks it and sends it again. What
now syncs is marked `resolved`; what still fails stays `open` with `attempts + 1` and its new
reasons; rows deleted from the source are marked `ignored`. A location whose token GrowthHub
refuses is skipped and named in the run's one alert; the others are replayed.

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
            items={"type": "string"},
            description="Location names or ids to replay (checked when the run starts); empty = all.",
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
    @task(pool=CONFIG.shards.pool)
    @fails_fast(CONFIG, None)
    def replay(params: dict[str, Any]) -> dict[str, Any]:
        from growthhub_sync.fleet import replay_fleet
        from growthhub_sync.pipeline import SyncOptions

        context = get_current_context()
        options = SyncOptions(run_id=context["run_id"], dag_id=REPLAY_DAG_ID, dry_run=params["dry_run"])
        return replay_fleet(
            CONFIG,
            options,
            requested=params["locations"],
            keys=params["keys"],
            stage=params["stage"],
            reason=params["reason"],
            max_rows=params["max_rows"],
        )

    @task(retries=0, trigger_rule="none_failed")  # a retry would count the metrics twice
    def report(replayed: dict[str, Any]) -> None:
        log.info("GrowthHub replay summary\n%s", summary_table(replayed["results"]))
        report_run(get_current_context(), replayed["results"], prefix="growthhub.replay")
        if replayed["failed"]:  # after the note: the run fails, its callback alerts once
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"location(s) failed: {', '.join(replayed['failed'])}")

    report(replay())


growthhub_quarantine_replay()
