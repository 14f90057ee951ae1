"""The Airflow plugin of the GrowthHub page (entry point ``airflow.plugins`` in pyproject.toml).

It mounts the page's FastAPI app at ``/growthhub`` on the API server and adds "GrowthHub" to the
UI's navigation; the UI shows the page in a frame, on the same origin, so the user's Airflow login
(the ``_token`` cookie) is what the page's checks see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from fastapi import FastAPI

URL_PREFIX = "/growthhub"


class _AppOnFirstRequest:
    """An ASGI app that builds the page's FastAPI app on its first request.

    The scheduler, the DAG processor and task processes load plugins too; they must not pay for
    importing the API server's security code, nor fail on a sync config only the page reads.
    """

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from growthhub_operator.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class GrowthHubPlugin(AirflowPlugin):
    name = "growthhub"
    fastapi_apps = [{"app": _AppOnFirstRequest(), "url_prefix": URL_PREFIX, "name": "GrowthHub"}]  # noqa: RUF012
    external_views = [  # noqa: RUF012
        {
            "name": "GrowthHub",
            # relative to the UI's base URL (no leading slash), so [api] base_url paths work
            "href": f"{URL_PREFIX.lstrip('/')}/",
            "url_route": "growthhub",
            "destination": "nav",
            "nav_top_level": True,
            "icon": f"{URL_PREFIX.lstrip('/')}/static/icon.svg",
        }
    ]
