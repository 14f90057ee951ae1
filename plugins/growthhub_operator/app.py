"""The GrowthHub page: a FastAPI app Airflow's API server mounts at ``/growthhub``.

``/growthhub/`` (also ``/growthhub/runs``) shows the sync runs per location; ``/growthhub/quarantine``
the open quarantine rows (``?location=&stage=&code=&before=``) with a replay button. The same data
is JSON under ``/growthhub/api/``. Reading takes the right to read the sync DAG's runs, replaying
the right to trigger the replay DAG (:mod:`growthhub_operator.access`). Links are relative, so the
page works under any ``[api] base_url`` and inside the UI's iframe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import BaseModel, Field

from growthhub_operator import access, queries
from growthhub_operator.chart import runs_chart
from growthhub_sync.config import load_config
from growthhub_sync.orchestration import REPLAY_DAG_ID, SYNC_DAG_ID
from growthhub_sync.state import state_tables
from growthhub_sync.warehouse import get_engine

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from growthhub_sync.config import SyncConfig
    from growthhub_sync.state import StateTables

HERE = Path(__file__).parent
Trigger = Callable[[dict[str, Any], BaseUser], str]
"""Queues a replay run with a conf, for a user; returns the run id."""
MAX_REPLAY = 1000
"""Rows one replay request may name (a page shows at most :data:`queries.MAX_PAGE`)."""


@dataclass(frozen=True)
class Warehouse:
    """Where the state tables are: the sync config's warehouse."""

    config: SyncConfig
    engine: Engine
    tables: StateTables

    @property
    def discovered(self) -> bool:
        """Whether locations are found at run time (``locations.from_column``), not listed."""
        return self.config.location_routing.from_column is not None

    def locations(self, found: Iterable[str] = ()) -> list[str]:
        """The listed locations; discovered ones add ``found``, those the state tables know (the
        config lists only overrides, if any)."""
        listed = [loc.name for loc in self.config.locations]
        return sorted({*listed, *found}) if self.discovered else listed


def get_warehouse() -> Warehouse:
    """The config is read on every request (cheap), so an edited config needs no restart."""
    config = load_config()
    return Warehouse(config, get_engine(config), state_tables(config.state))


WarehouseDep = Annotated[Warehouse, Depends(get_warehouse)]


class ReplayRequest(BaseModel):
    ids: list[int] = Field(min_length=1, max_length=MAX_REPLAY, description="quarantine row ids")


def quarantine_filter(
    location: Annotated[str | None, Query()] = None,
    stage: Annotated[str | None, Query()] = None,
    code: Annotated[str | None, Query()] = None,
) -> queries.QuarantineFilter:
    """The page's filters; an empty form field means no filter."""
    try:
        return queries.QuarantineFilter(location or None, stage or None, (code or "").strip() or None)
    except queries.BadFilter as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def replay_allowed(user: access.CurrentUser) -> bool:
    return access.may_replay(user)


def replay_trigger() -> Trigger:
    """What queues the replay run: Airflow's trigger (tests and other deployments may swap it)."""
    return access.trigger_replay


FilterDep = Annotated[queries.QuarantineFilter, Depends(quarantine_filter)]
Before = Annotated[int | None, Query(ge=1, description="cursor: rows with a smaller id")]
Limit = Annotated[int, Query(ge=1, le=queries.MAX_PAGE)]
LocationParam = Annotated[str | None, Query(max_length=200, description="one location only")]
SUMMARY_FROM = 12
"""Locations the runs page shows in full (chart and table each); more get one summary row each."""


def create_app() -> FastAPI:
    """Routes: pages, their JSON, the replay request and the static files."""
    app = FastAPI(title="GrowthHub", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    templates = _templates()
    read = [Depends(access.can_read_runs)]

    @app.get("/", response_class=HTMLResponse, dependencies=read)
    @app.get("/runs", response_class=HTMLResponse, dependencies=read, include_in_schema=False)
    def runs_page(request: Request, wh: WarehouseDep, location: LocationParam = None) -> HTMLResponse:
        return templates.TemplateResponse(request, "runs.html", _runs_context(wh, location=location))

    @app.get("/quarantine", response_class=HTMLResponse, dependencies=read)
    def quarantine_page(
        request: Request,
        wh: WarehouseDep,
        can_replay: Annotated[bool, Depends(replay_allowed)],
        where: FilterDep,
        before: Before = None,
    ) -> HTMLResponse:
        context = {**_quarantine_context(wh, where, before, limit=50), "can_replay": can_replay}
        return templates.TemplateResponse(request, "quarantine.html", context)

    @app.get("/api/runs", dependencies=read)
    def runs_json(wh: WarehouseDep, limit: Limit = 50, location: LocationParam = None) -> dict[str, Any]:
        context = _runs_context(wh, limit=limit, location=location, summary_from=None)
        return {"locations": [{**s, "runs": [r.as_dict() for r in s["runs"]]} for s in context["sections"]]}

    @app.get("/api/quarantine", dependencies=read)
    def quarantine_json(wh: WarehouseDep, where: FilterDep, before: Before = None, limit: Limit = 50) -> Any:
        page = _quarantine_context(wh, where, before, limit=limit)["page"]
        return {"rows": [i.as_dict() for i in page.items], "next_before": page.next_before}

    @app.post("/api/replay", dependencies=[Depends(access.can_trigger_replay)])
    def replay(
        body: ReplayRequest,
        wh: WarehouseDep,
        user: access.CurrentUser,
        trigger: Annotated[Trigger, Depends(replay_trigger)],
    ) -> dict[str, Any]:
        """Queue a replay of these rows: conf ``{"locations": [...], "keys": {location: [keys]}}``."""
        return _replay(wh, body.ids, user, trigger)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(HTTPException, _login_redirect)  # type: ignore[arg-type]
    return app


def _runs_context(
    wh: Warehouse, limit: int = 50, location: str | None = None, summary_from: int | None = SUMMARY_FROM
) -> dict[str, Any]:
    """Each location's recent runs; past ``summary_from`` locations (an agency's hundreds), one
    row per location with its latest run instead, each linking to its own page (``location``)."""
    sections, summary = [], []
    if queries.tables_exist(wh.engine, wh.tables):
        with wh.engine.connect() as conn:
            names = wh.locations(queries.run_locations(conn, wh.tables) if wh.discovered else ())
            if location is not None:
                names = [name for name in names if name == location]
            counts = queries.open_counts(conn, wh.tables, names)
            brief = summary_from is not None and len(names) > summary_from
            for name in names:
                runs = queries.recent_runs(conn, wh.tables, name, limit=1 if brief else limit)
                (summary if brief else sections).append(
                    {"location": name, "open_rows": counts.get(name, 0), "runs": runs}
                )
    return {
        "sections": sections,
        "summary": summary,
        "sync_dag": SYNC_DAG_ID,
        "chart": _chart,
        "count_cap": queries.COUNT_CAP,
    }


def _chart(runs_newest_first: list[queries.RunRow]) -> Markup:
    # runs_chart escapes every text it draws from the data (run ids, dates)
    return Markup(runs_chart(list(reversed(runs_newest_first))))  # noqa: S704


def _quarantine_context(
    wh: Warehouse, where: queries.QuarantineFilter, before: int | None, limit: int
) -> dict[str, Any]:
    page, locations = queries.QuarantinePage([], None), wh.locations()
    if queries.tables_exist(wh.engine, wh.tables):
        with wh.engine.connect() as conn:
            held = set(queries.open_pairs(conn, wh.tables)) if wh.discovered else None
            locations = wh.locations(loc for loc, _ in held or ())
            page = queries.quarantine_page(
                conn, wh.tables, locations, where, before=before, limit=limit, held=held
            )
    return {
        "page": page,
        "where": where,
        "query": {k: v for k, v in asdict(where).items() if v},
        "before": before,
        "locations": locations,
        "stages": queries.STAGES,
        "codes": sorted({c for item in page.items for c in item.codes} | {queries.UNKNOWN_CODE}),
        "replay_dag": REPLAY_DAG_ID,
        "now": datetime.now(UTC),
    }


def _replay(wh: Warehouse, ids: list[int], user: BaseUser, trigger: Trigger) -> dict[str, Any]:
    """The conf names the rows' keys per location; rows no longer open are left out and counted."""
    with wh.engine.connect() as conn:
        keys = queries.open_keys(conn, wh.tables, ids)
    selected = sum(len(v) for v in keys.values())
    if not selected:
        raise HTTPException(status.HTTP_409_CONFLICT, "none of the selected rows is still open")
    conf = {"locations": sorted(keys), "keys": keys}
    run_id = trigger(conf, user)
    skipped = len(set(ids)) - selected
    return {"dag_id": REPLAY_DAG_ID, "dag_run_id": run_id, "rows": selected, "skipped": skipped}


async def _login_redirect(request: Request, exc: HTTPException) -> Any:
    """A page asked for without a login goes to the login page and back; the JSON API answers 401."""
    from fastapi.exception_handlers import http_exception_handler

    if exc.status_code == status.HTTP_401_UNAUTHORIZED and "/api/" not in request.url.path:
        from airflow.api_fastapi.app import get_auth_manager

        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
    return await http_exception_handler(request, exc)


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["age"] = _age
    templates.env.filters["when"] = lambda d: d.strftime("%Y-%m-%d %H:%M") if d else ""
    return templates


def _age(since: datetime, now: datetime | None = None) -> str:
    """How long ago, in its two largest units: ``3d 4h``, ``5h 12m``, ``7m``."""
    seconds = max(int(((now or datetime.now(UTC)) - since).total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m"
