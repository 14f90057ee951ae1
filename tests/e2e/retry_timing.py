"""When Airflow retries a killed sync task: the kill tests pick a logical date with a short wait."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from growthhub_sync.orchestration import SYNC_DAG_ID

SYNC_TASK = "sync"


def retry_jitter_s(logical_date: datetime) -> int:
    """Extra seconds over the 60 s ``retry_delay`` Airflow adds to try 1's retry of the sync task.

    ``TaskInstance.next_retry_datetime`` with exponential backoff waits ``60 + h % 60`` s, ``h``
    a SHA-1 of ``dag_id#task_id#logical_date#try_number`` (deterministic per task instance). The
    worst of both string forms of the date is taken; if Airflow changes the formula the test only
    waits longer (up to 2 min).
    """
    forms = (str(logical_date), logical_date.isoformat())
    return max(
        int(hashlib.sha1(f"{SYNC_DAG_ID}#{SYNC_TASK}#{d}#1".encode(), usedforsecurity=False).hexdigest(), 16)
        % 60
        for d in forms
    )


def quick_retry_logical_date(first: datetime) -> datetime:
    """The hour from ``first`` on for which Airflow retries the sync task after ~60 s, not up to 119 s."""
    candidates = (first + timedelta(hours=i) for i in range(5000))
    return min(candidates, key=lambda d: (retry_jitter_s(d), d))
