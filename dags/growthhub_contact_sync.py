"""Warehouse → GrowthHub contact sync: one run per data interval over every location, in shards."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.sdk import (
    Asset,
    AssetAlias,
    CronDataIntervalTimetable,
    Param,
    conf,
    dag,
    get_current_context,
    task,
)

from growthhub_sync.config import load_config
from growthhub_sync.operator_view import report_run
from growthhub_sync.orchestration import (
    CONTACTS_ALIAS,
    DEFAULT_ARGS,
    SYNC_DAG_ID,
    alert_quota_backlog,
    alert_threshold_breach,
    alert_verify_breach,
    changed_assets,
    fails_fast,
    fleet_report,
    on_run_failure,
    run_window,
)

if TYPE_CHECKING:
    from growthhub_sync.pipeline import SyncOptions

CONFIG = load_config()
log = logging.getLogger(__name__)

DOC = """
### GrowthHub contact sync

Each run syncs the warehouse rows whose `updated_at` falls in the run's data interval (widened by
`lookback_minutes`) plus rows left *deferred* by earlier runs, for every location: the configured
list, or, with `locations.from_column`, every location the agency connection has installed (a
row's location is that column's value). The tasks are the same for 1 or 300 locations:

1. **plan**: one grouped count of the rows per location (quiet locations cost nothing more),
   key ranges for big locations, work items packed into at most `shards.max` shards balanced by
   rows; rows naming no installed location are quarantined (`location_unknown`,
   `location_not_installed`, `location_missing`), never sent;
2. **sync**: one mapped task per shard (pool `shards.pool`, one per API host), running
   `shards.location_concurrency` locations at once, each with its own token and rate limit;
3. **finalize**: one run row per location with work (*extracted = unchanged + created + updated +
   quarantined + rejected + deferred + deleted*); **publish** emits one Asset event per location whose
   contacts changed, through the `growthhub_contacts` AssetAlias (none on a dry run);
4. **report**: logs the table of counts per location with a total line and the quiet count,
   puts them on the run's note and into metrics, alerts once over the reject-rate threshold and
   once when the read-back of a sample of sent contacts finds fields GrowthHub did not store.

**Backfill**: `airflow backfill create --dag-id growthhub_contact_sync --from-date ... --to-date ...`.
**Params**: `full_refresh` (ignore window and ledger: send everything), `dry_run` (count and show
sample payloads, write nothing, emit no Asset event; its note starts with DRY RUN), `locations`
(names or ids to sync, checked at plan time; empty = all), `lookback_minutes`, `allow_mass_delete`
(let a run delete or tag more than `deletes.max_fraction` of a location's contacts).

**When it fails** you get one alert naming the failed location(s) and the cause. A location
whose token GrowthHub refuses (401/403) or whose config is wrong stops at once, without retries,
while every other location finishes; the report then fails the run. Fix the connection (or the
config) and run again. Transient API failures are retried; rows still failing are *deferred* and
picked up first by the next run. Rows in the quarantine table (`growthhub_quarantine`) carry
their reasons: fix them at the source, then trigger `growthhub_quarantine_replay`.
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
        "allow_mass_delete": Param(
            False,
            type="boolean",
            description="Delete or tag over deletes.max_fraction of a location's contacts.",
        ),
        "locations": Param(
            [],
            type="array",
            items={"type": "string"},
            description="Location names or ids to sync (checked when the run plans); empty = all.",
        ),
        "lookback_minutes": Param(
            CONFIG.lookback_minutes, type="integer", minimum=0, description="Widen the window for late rows."
        ),
    },
    tags=["growthhub", "reverse-etl"],
    doc_md=DOC,
)
def growthhub_contact_sync() -> None:
    @task
    @fails_fast(CONFIG, None)
    def plan(params: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """The shards to map over; the rest of the plan goes to finalize as XCom ``plan``."""
        from growthhub_sync.fleet import plan_fleet

        context = get_current_context()
        shards = min(CONFIG.shards.max, conf.getint("core", "max_map_length", fallback=1024))
        window, options = run_window(context, params["lookback_minutes"]), _options(context)
        planned = plan_fleet(CONFIG, window, options, requested=params["locations"], max_shards=shards)
        context["ti"].xcom_push(key="plan", value={k: v for k, v in planned.items() if k != "shards"})
        return planned["shards"]

    @task(pool=CONFIG.shards.pool)
    def sync(shard: list[dict[str, Any]], planned: dict[str, Any]) -> dict[str, Any]:
        from growthhub_sync.fleet import sync_shard

        return sync_shard(CONFIG, planned["window"], shard, _options(get_current_context()))

    @task(trigger_rule="none_failed")
    def finalize(planned: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
        from growthhub_sync.fleet import finalize_fleet

        # A slice is one XCom request. Iterating asks for the items one by one until the API
        # answers 404 past the last, which the Task SDK logs as an ERROR ("XCom not found").
        return finalize_fleet(CONFIG, planned, shards[:], _options(get_current_context()))

    @task.skip_if(lambda context: (context["params"]["dry_run"], "dry run: no Asset event"))
    @task(outlets=[AssetAlias(CONTACTS_ALIAS)])
    def publish(finalized: dict[str, Any], *, outlet_events: Any = None) -> None:
        """One Asset event per location whose contacts changed: DAGs scheduled on it run on them."""
        for uri in changed_assets(finalized["results"]):
            outlet_events[AssetAlias(CONTACTS_ALIAS)].add(Asset(uri))

    @task(retries=0, trigger_rule="none_failed")  # it sends alerts: a retry would send them twice
    def report(finalized: dict[str, Any]) -> None:
        context = get_current_context()
        log.info("GrowthHub sync run summary\n%s", fleet_report(finalized))
        report_run(context, finalized["results"], prefix="growthhub.sync")
        alert_threshold_breach(CONFIG, context, finalized["results"])
        alert_verify_breach(CONFIG, context, finalized["results"])
        alert_quota_backlog(CONFIG, context, finalized["results"])
        if finalized["failed"]:  # after writing everything: the run fails, its callback alerts once
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"location(s) failed: {', '.join(finalized['failed'])}")

    shards = plan()
    planned = shards["plan"]
    finalized = finalize(planned, sync.partial(planned=planned).expand(shard=shards))
    publish(finalized)
    report(finalized)


def _options(context: dict[str, Any]) -> SyncOptions:
    """Run options from the run's params; imported lazily to keep parsing cheap."""
    from growthhub_sync.pipeline import SyncOptions

    params = context["params"]
    return SyncOptions(
        run_id=context["run_id"],
        dag_id=context["dag"].dag_id,
        dry_run=params["dry_run"],
        full_refresh=params["full_refresh"],
        allow_mass_delete=params["allow_mass_delete"],
    )


growthhub_contact_sync()
