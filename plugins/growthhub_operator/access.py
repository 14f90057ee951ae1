"""The page's Airflow side: who may read and replay (Airflow's auth manager), and the trigger.

Reading the page takes what reading the sync DAG's runs takes; replaying takes what triggering
the replay DAG takes: the checks of Airflow's own REST API (``requires_access_dag``), so every
auth manager (simple, FAB, Keycloak, ...) and its roles and teams apply unchanged. The replay run
is created the way ``POST /api/v2/dags/{dag_id}/dagRuns`` creates one: the DAG's params validate
the conf, the run is queued and names the user who asked for it.
"""

from __future__ import annotations

from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import get_user, requires_access_dag
from fastapi import Depends, HTTPException, status

from growthhub_sync.orchestration import REPLAY_DAG_ID, SYNC_DAG_ID

can_read_runs = requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN, param_dag_id=SYNC_DAG_ID)
"""Dependency: the user is logged in and may read the runs of the sync DAG (else 401 / 403)."""
can_trigger_replay = requires_access_dag(
    method="POST", access_entity=DagAccessEntity.RUN, param_dag_id=REPLAY_DAG_ID
)
"""Dependency: the user may trigger the replay DAG (else 401 / 403)."""

CurrentUser = Annotated[BaseUser, Depends(get_user)]


def may_replay(user: BaseUser) -> bool:
    """Whether to offer the replay button (the replay endpoint checks again on its own)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel

    return get_auth_manager().is_authorized_dag(
        method="POST",
        access_entity=DagAccessEntity.RUN,
        details=DagDetails(id=REPLAY_DAG_ID, team_name=DagModel.get_team_name(REPLAY_DAG_ID)),
        user=user,
    )


def trigger_replay(conf: dict[str, Any], user: BaseUser) -> str:
    """Queue a run of the replay DAG with ``conf``; returns its run id."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagNotFound, DagRunAlreadyExists, ParamValidationError
    from airflow.utils.types import DagRunTriggeredByType

    try:
        run = trigger_dag(
            REPLAY_DAG_ID,
            triggered_by=DagRunTriggeredByType.UI,
            triggering_user_name=user.get_name(),
            conf=conf,
        )
    except DagNotFound:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"DAG {REPLAY_DAG_ID} is not parsed yet: check the DAG processor"
        ) from None
    except DagRunAlreadyExists:
        raise HTTPException(status.HTTP_409_CONFLICT, "a replay was queued this very moment: retry") from None
    except (ParamValidationError, ValueError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{REPLAY_DAG_ID} refused the conf: {exc}") from None
    if run is None:  # trigger_dag's signature allows it; never seen for a manual run
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "Airflow created no run")
    return run.run_id
