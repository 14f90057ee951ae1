"""Warehouse → GrowthHub contact sync: one run per data interval, one task group per location."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import (
    Asset,
    CronDataIntervalTimetable,
    Param,
    conf,
    dag,
    get_current_context,
    task,
    task_group,
)

from growthhub_sync.config import load_config
from growthhub_sync.operator_view import report_run
from growthhub_sync.orchestration import (
    DEFAULT_ARGS,
    SYNC_DAG_ID,
    alert_threshold_breach,
    fails_fast,
    on_run_failure,
    pool_name,
    run_window,
    selected_locations,
    summary_table,
)

if TYPE_CHECKING:
    from growthhub_sync.config import LocationConfig
    from growthhub_sync.pipeline import SyncOptions

CONFIG = load_config()
log = logging.getLogger(__name__)

DOC = """
### GrowthHub contact sync

Each run syncs the warehouse rows whose `updated_at` falls in the run's data interval (widened by
`lookback_minutes`) plus rows left *deferred* by earlier runs, for every configured location:

1. **plan**: counts the rows and cuts them into key-range batches;
2. **sync**: one mapped task per batch (pool `growthhub_<location id>` caps concurrent batches per
   location): map, check (Great Expectations), skip unchanged rows, upsert the rest;
3. **finalize**: adds up the batches, checks *extracted = unchanged + created + updated +
   quarantined + rejected + deferred*, writes the run row; then **publish** emits the location's
   Asset event (skipped on a dry run);
4. **report**: logs a table of the counts, puts them on the run's note (with the top reasons and
   a link to the quarantine page) and into metrics, and alerts once if a location's reject rate is
   over the configured threshold.

**Backfill**: `airflow backfill create --dag-id growthhub_contact_sync --from-date ... --to-date ...`.
**Params**: `full_refresh` (ignore window and ledger: send everything), `dry_run` (count and show
sample payloads, write nothing, emit no Asset event; its note starts with DRY RUN), `locations`
(subset), `lookback_minutes`.

**When it fails** you get one alert; its first line names the cause. Auth errors (401/403), an
API version GrowthHub refuses and config errors fail the task at once, without retries, and stop
the location's other batches: fix the connection (or the config) and clear the failed tasks.
Transient API failures are retried;
rows still failing are *deferred* and picked up first by the next run. Rows in the quarantine
table (`growthhub_quarantine`) carry their reasons: fix them at the source, then trigger
`growthhub_quarantine_replay`.
"""


@dag(
    dag_id=SYNC_DAG_ID,
    schedule=CronDataIntervalTimetable(CONFIG.schedule, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    on_failure_callback=on_run_failure,
    params={
        "full_refresh": Param(False, type="boolean", description="Ignore window and ledger; send every row."),
        "dry_run": Param(False, type="boolean", description="Count and sample payloads; write nothing."),
        "locations": Param(
            [],
            type="array",
            items={"type": "string", "enum": [loc.name for loc in CONFIG.locations]},
            description="Location names to sync; empty = all.",
        ),
        "lookback_minutes": Param(
            CONFIG.lookback_minutes, type="integer", minimum=0, description="Widen the window for late rows."
        ),
    },
    tags=["growthhub", "reverse-etl"],
    doc_md=DOC,
)
def growthhub_contact_sync() -> None:
    @task(retries=0, trigger_rule="none_failed")  # it sends alerts: a retry would send them twice
    def report(results: list[dict[str, Any] | None]) -> None:
        done = [r for r in results if r]
        log.info("GrowthHub sync run summary\n%s", summary_table(done))
        report_run(get_current_context(), done, prefix="growthhub.sync")
        alert_threshold_breach(CONFIG, get_current_context(), done)

    report([sync_location(location) for location in CONFIG.locations])


def sync_location(location: LocationConfig) -> Any:
    """plan → sync (mapped, pooled per location) → finalize, for one location."""
    name = location.name

    @task_group(group_id=f"location_{name}")
    def group() -> Any:
        @task
        @fails_fast(CONFIG, name)
        def plan(params: dict[str, Any]) -> list[dict[str, Any]]:
            from growthhub_sync.pipeline import plan_sync

            context = get_current_context()
            if name not in selected_locations(CONFIG, params["locations"]):
                return []
            window = run_window(context, params["lookback_minutes"])
            # one mapped sync task per ~batch_size rows; coarser if that would pass max_map_length
            planned = plan_sync(CONFIG, name, window, batch_rows=CONFIG.batch_size, options=_options(context))
            limit = conf.getint("core", "max_map_length", fallback=1024)
            if len(planned["batches"]) > limit:
                rows = -(-planned["total"] // (limit - 1))
                planned = plan_sync(CONFIG, name, window, batch_rows=rows, options=_options(context))
            return planned["batches"]

        @task(pool=pool_name(location.location_id))
        @fails_fast(CONFIG, name)
        def sync(key_range: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
            from growthhub_sync.pipeline import sync_batch

            context = get_current_context()
            window = run_window(context, params["lookback_minutes"])
            return sync_batch(CONFIG, name, window, key_range, _options(context))

        @task(trigger_rule="none_failed")
        @fails_fast(CONFIG, name)
        def finalize(batches: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any] | None:
            from growthhub_sync.pipeline import finalize_run

            context = get_current_context()
            if name not in selected_locations(CONFIG, params["locations"]):
                return None
            window = run_window(context, params["lookback_minutes"])
            # A slice is one XCom request. Iterating asks for the items one by one until the API
            # answers 404 past the last, which the Task SDK logs as an ERROR ("XCom not found").
            return finalize_run(CONFIG, name, window, batches[:], _options(context))

        @task.skip_if(lambda context: _no_asset_event(context, name))
        @task(outlets=[Asset(f"growthhub://{location.location_id}/contacts")])
        def publish() -> None:
            """The location's Asset event: DAGs scheduled on it run on the synced contacts."""

        done = finalize(sync.expand(key_range=plan()))
        done >> publish()
        return done

    return group()


def _no_asset_event(context: dict[str, Any], name: str) -> tuple[bool, str]:
    """A dry run, or a run of other locations, changed nothing a downstream DAG could read."""
    params = context["params"]
    if params["dry_run"]:
        return True, "dry run: no Asset event"
    if name not in selected_locations(CONFIG, params["locations"]):
        return True, f"location {name} is not in this run: no Asset event"
    return False, ""


def _options(context: dict[str, Any]) -> SyncOptions:
    """Run options from the run's params; imported lazily to keep parsing cheap."""
    from growthhub_sync.pipeline import SyncOptions

    params = context["params"]
    return SyncOptions(
        run_id=context["run_id"],
        dag_id=context["dag"].dag_id,
        dry_run=params["dry_run"],
        full_refresh=params["full_refresh"],
    )


growthhub_contact_sync()
