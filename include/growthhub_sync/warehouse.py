"""The warehouse: which database a config means, as one SQLAlchemy engine per URL and process.

``source.url`` (a SQLAlchemy URL) wins; otherwise the Airflow connection ``source.conn_id`` is
resolved, and only then is Airflow imported. The state tables live in the same database.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine

from growthhub_sync.config import MissingConnectionError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from growthhub_sync.config import SyncConfig


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """One pooled engine per URL and process (tasks of one worker reuse its connections)."""
    # hide_parameters: a failing statement must not print contacts' emails and phones into the log
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # mapped tasks on one SQLite file wait for the lock
    return create_engine(url, **kwargs)


def warehouse_url(conn_id: str) -> str:
    """SQLAlchemy URL of an Airflow connection (only this function needs Airflow).

    An explicit ``sqlalchemy_url`` extra wins; ``sqlite`` connections name the file in
    ``host``; otherwise the connection's hook decides (``PostgresHook.sqlalchemy_url``).

    :raises MissingConnectionError: no connection ``conn_id`` is defined.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise MissingConnectionError("source.conn_id", conn_id) from None
    if url := conn.extra_dejson.get("sqlalchemy_url"):
        return str(url)
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}"
    try:
        url = conn.get_hook().sqlalchemy_url
        return url.render_as_string(hide_password=False) if hasattr(url, "render_as_string") else str(url)
    except Exception:  # hooks without a sqlalchemy_url: fall back to the connection URI
        return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", conn.get_uri())


def get_engine(config: SyncConfig, engine: Engine | None = None) -> Engine:
    """The given engine, else ``source.url``, else the Airflow connection ``source.conn_id``."""
    if engine is not None:
        return engine
    return engine_for(config.source.url or warehouse_url(config.source.conn_id))
