"""Warehouse → GrowthHub contact sync: config, extract, map, check, diff, record.

What the DAGs call::

    config = load_config()                       # $GROWTHHUB_SYNC_CONFIG or the shipped default
    plan = plan_sync(config, "default", window, options=opts)            # → {"batches": [...], ...}
    done = [sync_batch(config, "default", plan["window"], b, opts) for b in plan["batches"]]
    summary = finalize_run(config, "default", plan["window"], done, opts)
    replay_quarantine(config, "default", opts, stage="api", max_rows=1000)

Importing this package does not import Great Expectations or Airflow (cheap DAG parsing).
"""

from growthhub_sync.config import ConfigError, SyncConfig, load_config
from growthhub_sync.extract import KeyRange, Window
from growthhub_sync.pipeline import (
    SyncInvariantError,
    SyncOptions,
    finalize_run,
    plan_sync,
    replay_quarantine,
    sync,
    sync_batch,
)

__all__ = [
    "ConfigError",
    "KeyRange",
    "SyncConfig",
    "SyncInvariantError",
    "SyncOptions",
    "Window",
    "finalize_run",
    "load_config",
    "plan_sync",
    "replay_quarantine",
    "sync",
    "sync_batch",
]
